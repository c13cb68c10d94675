"""`minilab run RECIPE`: the whole pipeline from one file, with stage caching.

A recipe (YAML or JSON) names its stages in order; each stage is one of the stage verbs (corpus,
tokenizer, pack, pretrain, eval, sft-data, sft, dpo-data, dpo, merge, export, quantize) with its
config, and `${other_stage}` references wire outputs to inputs:

    name: demo
    stages:
      corpus:    {sources: [{path: default}]}
      tokenizer: {corpus_dir: "${corpus}", vocab_size: 4096}
      pack:      {corpus_dir: "${corpus}", tokenizer_dir: "${tokenizer}", seq_len: 256}
      pretrain:  {data_dirs: ["${pack}"], tokenizer_dir: "${tokenizer}", arch: micro, max_steps: 600}

- `spec.py`: reading and checking a recipe, resolving references, fingerprints.
- `stages.py`: a stage kind's config as a recipe stage, its result as state; what each kind runs,
  where its output is, its key metric and estimate are its module's `STAGE` (`minilab.stage`).
- `runner.py`: the plan (what is cached, what reruns and why), execution with per-stage state
  files, resume of an interrupted training stage, the summary table and the CLI verb.
- `report.py`: the recipe's report (Markdown and HTML) with every training stage's plots.

See docs/recipes.md.
"""
