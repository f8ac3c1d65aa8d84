"""stack-dpo's library: everything the stage entry points in stages/ share.

- params (the schema of params.yaml), paths (the output paths of dvc.yaml), dataset (the raw
  schema and the prompt template), outputs (crash-safe writers), entrypoint (how a stage starts);
- hub, modeling (model and tokenizer loading, LoRA, log-probs, the merge), compat (the private TRL
  and transformers methods relied on, wrapped once), fit (batch sizes fitted to the device's
  memory), machine (what a run needs of the machine, checked first), training (trainer setup,
  checkpoints, resume),
  pairs (DPO pairs and their stored reference log-probs), card (the model card), faults (failure
  classes and exit codes), cli (the `stack-dpo` command);
- one module per stage for the work only that stage does (fetch, prepare, sft, dpo, merge,
  evaluate, push, sources).

This file holds no code: dvc.yaml lists a stage's code deps as the modules it imports.
"""
