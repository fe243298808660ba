"""LoRA on the micro LLM, trained on teacher text: ppl_val, ppl_train and ppl_base along the run.

    python experiments/micro_llm_lora.py [--lr 1e-2] [--steps 300] [--rank 8] [--train 16]
        [--every 25] [--seed 0] [--model DIR]

A peft LoRA on q/k/v/o of the shipped micro LLM (or --model), AdamW at a constant lr, batches of
16 texts drawn from the teacher training texts (`dallm.micro_llm.data.text_sets`), perplexities
with their bootstrap spread every --every steps: the figures of docs/llm.md. One thread.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--train", type=int, default=16, help="teacher training texts")
    p.add_argument("--every", type=int, default=25, help="evaluate every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="model folder (default: the shipped micro LLM)")
    args = p.parse_args()
    torch.set_num_threads(1)
    from peft import LoraConfig, get_peft_model

    from dallm.micro_llm import load
    from dallm.micro_llm.data import text_sets
    from dallm.micro_llm.metrics import IGNORE, encode, model_perplexity

    model, tok = load(args.model)
    sets = text_sets(n_train=args.train, n_val=64, n_base=64, seed=args.seed)
    torch.manual_seed(args.seed)
    config = LoraConfig(
        r=args.rank, lora_alpha=args.rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    peft_model = get_peft_model(model, config)
    opt = torch.optim.AdamW([q for q in peft_model.parameters() if q.requires_grad], lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    print("step  ppl_val  ppl_train  ppl_base  seconds")
    for step in range(args.steps + 1):
        if step % args.every == 0 or step == args.steps:
            v, tr, b = (
                model_perplexity(peft_model, tok, x) for x in (sets.validation, sets.train, sets.base)
            )
            print(
                f"{step:4d}  {v.value:.3f}±{v.std:.3f}  {tr.value:.3f}±{tr.std:.3f}  {b.value:.2f}±{b.std:.2f}"
                f"  {time.perf_counter() - t0:.1f}",
                flush=True,
            )
        if step == args.steps:
            break
        peft_model.train()
        idx = torch.randint(0, len(sets.train), (16,), generator=g).tolist()
        ids, labels = encode(tok, [sets.train[i] for i in idx])
        loss = peft_model(input_ids=ids, attention_mask=(labels != IGNORE).long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


if __name__ == "__main__":
    main()
