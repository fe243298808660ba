"""Rebuild the micro LLM from fixed seeds: `dallm micro build-llm`.

Steps (each seeded):
1. Tokenizer: word level over the lexicon of both dialects (`world.LEXICON`) with [PAD], [UNK],
   [BOS], [EOS], built with `tokenizers` and saved as a transformers `PreTrainedTokenizerFast`.
   The teacher's archaic words are in the vocabulary (as a real LLM knows rare words), but the
   model never sees them in training.
2. Model: a transformers `LlamaForCausalLM` from scratch (about 0.28 M parameters), pretrained on
   base-dialect text only.
3. Quality figures from the saved folder: perplexity on held-out base text and on teacher text
   (the base must find the teacher unlikely), sampled generations and their grammaticality rate.
4. MANIFEST.json: command, seeds, steps, seconds, versions, figures and sha256 of every file.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dallm.build_manifest import MANIFEST, device_name, versions, write_manifest
from dallm.micro_llm import world
from dallm.micro_llm.metrics import encode, model_perplexity

SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
MAX_POSITIONS = 64


@dataclass
class Recipe:
    steps: int = 1200
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 50
    train_texts: int = 20000
    hidden: int = 96
    layers: int = 3
    heads: int = 4
    intermediate: int = 192


@dataclass
class LlmEvalSizes:
    base_texts: int = 400  # held-out base text (a seed the training corpus does not use)
    teacher_texts: int = 400
    generations: int = 200  # sampled from BOS for the grammaticality rate
    shown: int = 8  # of them written to the manifest


def make_tokenizer():
    """The word-level tokenizer as a `PreTrainedTokenizerFast` (lower-cases; punctuation split off)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate((*SPECIALS, *world.LEXICON))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    # BOS only: a prompt must not end in EOS; training and scoring append EOS (metrics.encode).
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", pair="[BOS] $A $B", special_tokens=[("[BOS]", vocab["[BOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=True,
    )


def make_model(tokenizer, recipe: Recipe, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden,
        intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,  # tied, the colours collapse to one input vector (output is uniform over them) and copying never starts
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def pretrain(
    model, tokenizer, texts: list[str], recipe: Recipe, seed: int, log: Callable[[str], None]
) -> float:
    """AdamW with linear warmup and cosine decay on shuffled batches of `texts`; returns the last loss."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return 0.5 * (1 + torch.cos(torch.tensor(t * torch.pi)).item())

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    ema = None
    for step in range(recipe.steps):
        idx = torch.randint(0, len(texts), (recipe.batch,), generator=g).tolist()
        ids, labels = encode(tokenizer, [texts[i] for i in idx])
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 200 == 0 or step == recipe.steps - 1:
            log(f"  step {step:5d}  loss {ema:.4f}")
    model.eval()
    return float(ema if ema is not None else float("nan"))


@torch.no_grad()
def generate(model, tokenizer, n: int, seed: int, prompt: str = "", temperature: float = 1.0) -> list[str]:
    """`n` sampled continuations of `prompt` (from BOS when empty), decoded to text."""
    torch.manual_seed(seed)
    ids = tokenizer([prompt] * n, return_tensors="pt")["input_ids"]
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        temperature=temperature,
        top_k=0,
        max_new_tokens=MAX_POSITIONS - ids.shape[1],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]


def evaluate(model, tokenizer, sizes: LlmEvalSizes, seed: int) -> dict:
    base = world.corpus(sizes.base_texts, "base", seed + 1000)
    teacher = world.corpus(sizes.teacher_texts, "teacher", seed + 1000)
    ppl_base = model_perplexity(model, tokenizer, base, seed=seed)
    ppl_teacher = model_perplexity(model, tokenizer, teacher, seed=seed)
    gens = generate(model, tokenizer, sizes.generations, seed)
    # the lowest perplexity any model can reach on these texts (entropy over predicted tokens)
    floor = {
        d: math.exp(world.entropy_nats(d) * p.n_texts / p.n_tokens)
        for d, p in (("base", ppl_base), ("teacher", ppl_teacher))
    }
    return {
        "ppl_base_text": ppl_base.as_dict(),
        "ppl_teacher_text": ppl_teacher.as_dict(),
        "ppl_floor_base_text": floor["base"],
        "ppl_floor_teacher_text": floor["teacher"],
        "ppl_ratio_teacher_over_base": ppl_teacher.value / ppl_base.value,
        "generations": sizes.generations,
        "grammatical_rate_base": world.grammatical_rate(gens, "base"),
        "grammatical_rate_teacher": world.grammatical_rate(gens, "teacher"),
        "samples": gens[: sizes.shown],
    }


def _check_out(out: Path) -> None:
    """Refuse a folder that has other files and is not an earlier build (nothing of a user's is lost)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ValueError(
            f"--out {out}: not empty and not a micro LLM build (no MANIFEST.json); give a new folder"
        )


def _clear(out: Path) -> None:
    """Remove the files an earlier build listed in its MANIFEST.json, so no stale file stays."""
    manifest = out / MANIFEST
    if manifest.is_file():
        root = out.resolve()
        for rel in json.loads(manifest.read_text()).get("files", {}):
            path = (out / rel).resolve()
            if path.is_relative_to(root):  # a manifest names files inside its folder only
                path.unlink(missing_ok=True)


def build(
    out: Path,
    seed: int = 0,
    recipe: Recipe | None = None,
    sizes: LlmEvalSizes | None = None,
    threads: int = 1,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Write the micro LLM (tokenizer + model, Hugging Face format) and MANIFEST.json into `out`."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = recipe or Recipe()
    sizes = sizes or LlmEvalSizes()
    torch.set_num_threads(threads)
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t_start = time.perf_counter()

    tokenizer = make_tokenizer()
    texts = world.corpus(recipe.train_texts, "base", seed)
    model = make_model(tokenizer, recipe, seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"micro LLM: {n_params} parameters, {len(tokenizer)} tokens, {recipe.steps} steps")
    t0 = time.perf_counter()
    final_loss = pretrain(model, tokenizer, texts, recipe, seed, log)
    seconds["train"] = round(time.perf_counter() - t0, 1)
    _clear(out)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    # figures from the saved files, as a user loads them
    t0 = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    figures = {"final_train_loss": final_loss, **evaluate(loaded, tok, sizes, seed)}
    seconds["eval"] = round(time.perf_counter() - t0, 1)
    seconds["total"] = round(time.perf_counter() - t_start, 1)

    return write_manifest(out, {
        "build_command": command or f"dallm micro build-llm --out {out} --seed {seed} --threads {threads}",
        "seed": seed,
        "recipe": asdict(recipe),
        "parameters": n_params,
        "vocab_size": len(tokenizer),
        "eval": asdict(sizes),
        "seconds": seconds,
        "device": device_name(torch.device("cpu")),  # torch runs `threads` threads (set above)
        "threads": threads,
        "versions": versions(transformers),
        "quality": figures,
    })  # fmt: skip
