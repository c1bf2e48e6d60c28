"""Host tensors never reach a raw collective (issue 16, defect 3: NCCL takes CUDA tensors only).

- `device_for_backend` maps NCCL to CUDA and gloo (alone or paired with NCCL) to the CPU;
- `all_reduce_` reduces a host tensor over a real 2-rank gloo group (sum and max) in place;
- a static guard walks every module of r1_megatron and fails on a torch.distributed collective whose
  tensor was made on the host: a torch constructor without `device=` (directly, through a local name,
  or through a `self.` attribute set that way anywhere in the module), `.cpu()` / `.to("cpu")`, and
  methods chained on those. The guard is shown to catch the three defects the issue names, in their
  original source. Host collectives that are right by construction are listed with their reason.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from r1_megatron.parallel.collectives import all_reduce_, collective_device, device_for_backend

REPO = Path(__file__).resolve().parents[2]
COLLECTIVES = {
    "all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
    "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv",
    "gather", "scatter",
}
CONSTRUCTORS = {
    "tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange", "linspace", "rand", "randn",
    "randint", "from_numpy",
}
# (file, function) -> why a host tensor is right there.
ALLOWED = {
    ("r1_megatron/cli/validate.py", "_agree"): "reduces over a gloo group it starts itself",
    ("r1_megatron/parallel/compat_cpu.py", "_get_grad_norm_fp32"): "a CPU-only patch (compat_cpu runs without CUDA)",
}


def _is_cpu_arg(node: ast.AST) -> bool:
    return (isinstance(node, ast.Constant) and node.value == "cpu") or (
        isinstance(node, ast.Call) and ast.unparse(node.func).endswith("device")
        and any(isinstance(a, ast.Constant) and a.value == "cpu" for a in node.args)
    )


class _HostTensors(ast.NodeVisitor):
    """Finds collectives over host-made tensors in one module. `host_attrs` holds `self.X` names
    assigned a host tensor anywhere in the module (a first pass)."""

    def __init__(self, host_attrs: set[str]) -> None:
        self.host_attrs = host_attrs
        self.names: list[set[str]] = [set()]
        self.func: list[str] = ["<module>"]
        self.found: list[tuple[str, int, str]] = []

    def is_host(self, node: ast.AST) -> bool:
        if isinstance(node, ast.Name):
            return node.id in self.names[-1]
        if isinstance(node, ast.Attribute):
            return isinstance(node.value, ast.Name) and node.value.id == "self" and node.attr in self.host_attrs
        if isinstance(node, ast.Subscript):
            return self.is_host(node.value)
        if not isinstance(node, ast.Call):
            return False
        func = node.func
        if isinstance(func, ast.Attribute) and ast.unparse(func.value) == "torch" and func.attr in CONSTRUCTORS:
            return not any(k.arg == "device" for k in node.keywords)
        if isinstance(func, ast.Attribute):
            if func.attr == "cpu":
                return True
            if func.attr == "to":
                if any(_is_cpu_arg(a) for a in node.args) or any(
                        k.arg == "device" and _is_cpu_arg(k.value) for k in node.keywords):
                    return True
                moves = node.args and not (isinstance(node.args[0], ast.Attribute)
                                           and ast.unparse(node.args[0]).startswith("torch."))
                return False if moves or any(k.arg == "device" for k in node.keywords) else self.is_host(func.value)
            if func.attr == "cuda":
                return False
            return self.is_host(func.value)
        return False

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.names.append(set())
        self.func.append(node.name)
        self.generic_visit(node)
        self.func.pop()
        self.names.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Assign(self, node: ast.Assign) -> None:
        self.generic_visit(node)
        host = self.is_host(node.value)
        for target in node.targets:
            if isinstance(target, ast.Name):
                (self.names[-1].add if host else self.names[-1].discard)(target.id)

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        f = node.func
        if not (isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and ast.unparse(f.value) in (
                "dist", "torch.distributed")):
            return
        args = [*node.args, *(k.value for k in node.keywords if k.arg in ("tensor", "input_tensor", "output"))]
        if any(self.is_host(a) for a in args):
            self.found.append((self.func[-1], node.lineno, ast.unparse(node)))


def host_collectives(source: str) -> list[tuple[str, int, str]]:
    """(function, line, call) of every collective over a host-made tensor in `source`."""
    tree = ast.parse(source)
    probe = _HostTensors(set())
    attrs = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and probe.is_host(node.value):
            attrs |= {t.attr for t in node.targets if isinstance(t, ast.Attribute)
                      and isinstance(t.value, ast.Name) and t.value.id == "self"}
    visitor = _HostTensors(attrs)
    visitor.visit(tree)
    return visitor.found


# The three collectives issue 16 names, as they were before the fix.
OLD_EXPERT_LOAD = """
class ExpertLoad:
    def __init__(self, num_layers, num_experts):
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64)

    def step(self, group=None):
        load = self.counts.clone()
        if dist.is_initialized():
            dist.all_reduce(load, group=group)
        return load
"""
OLD_PLACEMENT_OF = """
def placement_of(model, num_moe_layers, num_slots):
    out = torch.full((num_moe_layers, num_slots), -1, dtype=torch.int64)
    for layer in redundant_layers(model):
        out[layer.moe_index] = layer.phy2log.cpu()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out
"""
OLD_DP_SUM = """
class Trainer:
    def dp_sum(self, value):
        t = torch.as_tensor(value, dtype=torch.float64).reshape(1).clone()
        dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
        return t[0]
"""


@pytest.mark.parametrize("source,func", [(OLD_EXPERT_LOAD, "step"), (OLD_PLACEMENT_OF, "placement_of"),
                                         (OLD_DP_SUM, "dp_sum")])
def test_guard_catches_the_reported_defects(source, func):
    assert [f for f, _, _ in host_collectives(textwrap.dedent(source))] == [func]


def test_guard_accepts_device_tensors():
    ok = """
    def f(self, group, device):
        a = torch.zeros(3, device=device)
        b = torch.as_tensor(1.0).to(self.device)
        c = self.counts.to(collective_device(group))
        dist.all_reduce(a); dist.all_reduce(b); dist.all_reduce(c)
        all_reduce_(torch.zeros(2), group=group)
    """
    assert host_collectives(textwrap.dedent(ok)) == []
    bad = "def g():\n    x = torch.ones(2).double()\n    dist.broadcast(x.cpu(), src=0)\n    dist.all_reduce(x)\n"
    assert [line for _, line, _ in host_collectives(bad)] == [3, 4]


def test_no_collective_on_host_tensors_in_the_tree():
    found, allowed_seen = [], set()
    for path in sorted((REPO / "r1_megatron").rglob("*.py")):
        rel = str(path.relative_to(REPO))
        for func, line, call in host_collectives(path.read_text()):
            if (rel, func) in ALLOWED:
                allowed_seen.add((rel, func))
            else:
                found.append(f"{rel}:{line} in {func}: {call}")
    assert not found, "collective on a host tensor (use parallel.collectives.all_reduce_):\n" + "\n".join(found)
    assert allowed_seen == set(ALLOWED), f"stale ALLOWED entries: {set(ALLOWED) - allowed_seen}"


def test_device_for_backend():
    assert device_for_backend("nccl") == torch.device("cuda")
    assert device_for_backend("gloo") == torch.device("cpu")
    assert device_for_backend("cpu:gloo,cuda:nccl") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown torch.distributed backend 'xyz'"):
        device_for_backend("xyz")


def _reduce_worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        counts = torch.tensor([rank + 1.0, 10.0 * rank], dtype=torch.float64)
        same = all_reduce_(counts)
        peak = all_reduce_(torch.tensor([rank, -rank]), op=dist.ReduceOp.MAX)
        if rank == 0:
            torch.save({"device": str(collective_device()), "sum": counts, "same": same is counts,
                        "max": peak}, out)
    finally:
        dist.destroy_process_group()


def test_all_reduce_host_tensor_over_gloo(tmp_path):
    out = tmp_path / "r.pt"
    mp.spawn(_reduce_worker, args=(2, f"file://{tmp_path / 'store'}", str(out)), nprocs=2)
    r = torch.load(out)
    assert r["device"] == "cpu" and r["same"]
    assert r["sum"].tolist() == [3.0, 10.0] and r["max"].tolist() == [1, 0]


@pytest.mark.gpu
def test_all_reduce_host_tensor_over_nccl(tmp_path):
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.cuda.set_device(0)
        counts = torch.tensor([1.0, 2.0], dtype=torch.float64)
        assert collective_device().type == "cuda"
        assert all_reduce_(counts).device.type == "cpu" and counts.tolist() == [1.0, 2.0]
    finally:
        dist.destroy_process_group()
