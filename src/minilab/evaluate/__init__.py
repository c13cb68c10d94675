"""Evaluation: perplexity and bits per byte, multiple choice with baselines, generations, a report.

The `minilab eval` verb is `minilab.evaluate.stage` (`EvalConfig`, `run(cfg)`); the pieces are
usable on their own:

    from minilab.evaluate.perplexity import text_perplexity, packed_perplexity
    from minilab.evaluate.multiple_choice import evaluate_file
"""

from minilab.evaluate.stage import EvalConfig, run

__all__ = ["EvalConfig", "run"]
