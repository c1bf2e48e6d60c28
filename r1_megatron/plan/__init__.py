"""Paper planning of big layouts: parameter counts from the card, per-GPU memory by phase, KV-cache room
for rollout, refit traffic and host memory for offload. Needs no GPU (and no torch)."""

from r1_megatron.plan.memory import GiB, Layout, Plan, Precision, Workload, plan
from r1_megatron.plan.params import ParamCount, count_params
from r1_megatron.plan.report import format_text, plan_job, to_json

__all__ = [
    "GiB",
    "Layout",
    "ParamCount",
    "Plan",
    "Precision",
    "Workload",
    "count_params",
    "format_text",
    "plan",
    "plan_job",
    "to_json",
]
