"""The resource planner: will a model fit in RAM, VRAM and disk, before anything runs.

    from minilab.planner import resolve_model, build_meta, inspect_model, plan_memory, PlanRequest
    an = inspect_model(build_meta(resolve_model("TinyLlama/TinyLlama-1.1B-Chat-v1.0")))
    plan_memory(an, PlanRequest(method="qlora", batch_size=4, seq_len=1024, target="cuda")).total

`plan(...)` does all of it (memory, disk, weights by format, verdict) and is what `minilab plan`
prints; `preflight` is what training stages call before their first step.
"""

from minilab.planner.anatomy import Anatomy, accelerate_estimate, inspect_model, weight_bytes, weight_table
from minilab.planner.memory import MemoryPlan, PlanRequest, plan_memory
from minilab.planner.resolve import ModelSpec, build_meta, resolve_model

__all__ = ["Anatomy", "MemoryPlan", "ModelSpec", "PlanRequest", "accelerate_estimate", "build_meta",
           "inspect_model", "plan_memory", "resolve_model", "weight_bytes", "weight_table"]
