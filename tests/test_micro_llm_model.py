"""The shipped micro LLM: offline loading, MANIFEST sha256s and figures, grammar, and LoRA on it.

The LoRA test is the world's point in small: a few dozen steps of a peft LoRA on the attention
projections, trained on teacher text the base never saw, bring teacher perplexity down clearly.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from dallm.build_manifest import sha256
from dallm.micro_llm import MANIFEST_PATH, MODEL_DIR, load, world
from dallm.micro_llm.build import Recipe, generate, make_model
from dallm.micro_llm.data import text_sets
from dallm.micro_llm.metrics import encode, model_perplexity


@pytest.fixture(scope="module")
def micro_llm():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    torch.set_num_threads(1)
    return load()


def test_manifest_matches_the_files_and_states_the_figures() -> None:
    manifest = json.loads(MANIFEST_PATH.read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(
        manifest["files"]
    )
    for rel, entry in manifest["files"].items():
        assert sha256(MODEL_DIR / rel) == entry["sha256"], rel
        assert (MODEL_DIR / rel).stat().st_size == entry["bytes"], rel
    assert manifest["total_bytes"] <= 10 * 1024 * 1024
    q = manifest["quality"]
    assert q["grammatical_rate_base"] >= 0.85 and q["generations"] >= 200
    assert q["ppl_ratio_teacher_over_base"] >= 10
    # near the corpus' entropy: within 5% of the lowest perplexity any model can reach
    assert q["ppl_floor_base_text"] < q["ppl_base_text"]["value"] < 1.05 * q["ppl_floor_base_text"]
    assert q["ppl_base_text"]["std"] > 0 and q["ppl_base_text"]["n_texts"] >= 400
    assert {"build_command", "seed", "recipe", "seconds", "device", "parameters"} <= set(manifest)


def test_loads_offline_with_the_auto_classes(micro_llm) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    assert model.config.model_type == "llama" and 1e5 < model.num_parameters() < 5e6
    ids = tok("behold, upon a field of blue")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "behold, upon a field of blue"


def test_base_model_writes_the_grammar_and_finds_the_teacher_unlikely(micro_llm) -> None:
    model, tok = micro_llm
    gens = generate(model, tok, n=40, seed=7)
    assert world.grammatical_rate(gens, "base") >= 0.75, gens[:5]
    base = world.corpus(64, "base", 77)
    teacher = world.corpus(64, "teacher", 77)
    ppl_base = model_perplexity(model, tok, base)
    ppl_teacher = model_perplexity(model, tok, teacher)
    assert ppl_base.value < 2.5 and ppl_teacher.value > 10 * ppl_base.value
    # an untrained model of the same shape fails both thresholds
    untrained = make_model(tok, Recipe(), seed=0).eval()
    assert world.grammatical_rate(generate(untrained, tok, n=40, seed=7), "base") < 0.1
    assert model_perplexity(untrained, tok, base).value > 10


def test_lora_on_teacher_text_lowers_teacher_perplexity(micro_llm) -> None:
    from peft import LoraConfig, get_peft_model

    model, tok = micro_llm
    sets = text_sets(n_train=64, n_val=64, n_base=64, seed=0)
    before = model_perplexity(model, tok, sets.validation)
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = get_peft_model(model, config)
    try:
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
        g = torch.Generator().manual_seed(0)
        peft_model.train()
        for _ in range(40):
            idx = torch.randint(0, len(sets.train), (16,), generator=g).tolist()
            ids, labels = encode(tok, [sets.train[i] for i in idx])
            loss = peft_model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        after = model_perplexity(peft_model, tok, sets.validation)
    finally:
        peft_model.unload()  # the module-scoped base model stays as shipped
    # held-out teacher scenes: a clear fall, far outside the spread of either figure
    assert after.value < before.value / 20
    assert before.value - after.value > 10 * (before.std + after.std)
