"""LLM LoRA jobs (`[model] kind = "llm"`): the same job, monitor, checkpoints and daemon as image jobs.

- `dallm.llm.data`: the training, validation and base texts (JSONL or .txt files), and the preflight.
- `dallm.llm.source`: where the base model comes from (micro-llm, a folder, a hub id), 4-bit needs.
- `dallm.llm.model`: loading a causal LM (`from_pretrained`; bf16 on GPU, optional 4-bit) and its LoRA.
- `dallm.llm.trainer`: `LlmTrainer`, one step and the state around it (the `ImageTrainer`'s twin).
- `dallm.llm.evaluation`: `LlmEvaluator`, perplexities with a spread and fixed-prompt generations.
- `dallm.llm.train`: `train_llm`, the job: the image job's loop (`dallm.engine.job.Job`) with the above.
- `dallm.llm.export`: the result as a peft adapter folder (`PeftModel.from_pretrained` loads it).

Importing this package does not import torch.
"""
