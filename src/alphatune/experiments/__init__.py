"""The paper comparison (issue 12): every method in one harness, on the paper's tasks.

- ``spec``: what one run is and what its result file records;
- ``tasks``: E2E, WebNLG (and its held-out-categories variant) and SST-2: data, evaluation
  sets and scoring;
- ``methods``: full fine-tuning, LoRA, PTQ after fine-tuning, PTQ → LoRA, QLoRA, PEQA, prompt
  tuning and AlphaTuning with its ablations;
- ``runner``: one run, resumable; ``grid``: which runs, in which order, with which learning rate;
- ``report``: the result files rendered into docs/results.md with plots; ``dev_tables``: its
  dev-set tables (learning-rate searches, recipe candidates, dev-only tasks).

``python -m alphatune.experiments --help`` runs it.
"""
