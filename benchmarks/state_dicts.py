"""The state dicts the benchmark saves and loads, and helpers to walk them.

* ``transformer``: fp32 weights of a decoder-only transformer (token embedding, per block
  qkv / out / MLP up / MLP down with biases, two layer norms, final norm, untied LM head),
  with the width chosen from the size: d_model 256 below 128 MiB, 1024 up to ~2 GiB, 2048
  beyond; the number of blocks fills the requested size.
* ``tiny``: N tensors of 16..256 float32 elements (what a very fine-grained module tree, or
  per-parameter optimizer scalars, look like).
* ``optimizer``: a transformer's model state plus Adam's state for it, nested exactly as
  ``torch.optim.Adam.state_dict()`` nests it (``state`` keyed by int, 0-d float32 ``step``
  tensors, ``exp_avg`` / ``exp_avg_sq``, ``param_groups`` with a tuple of betas): the model
  takes a third of the bytes, the moments two thirds.

Every tensor is filled (random bytes are not needed; touched pages are): fresh ``torch.empty``
memory would make the first copy pay for page faults.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Spec:
    """One state dict to benchmark: a name for the table and how to build it."""

    name: str
    kind: str  # transformer | tiny | optimizer
    nbytes: int  # requested size (tiny: the count of tensors)

    def build(self) -> dict[str, Any]:
        if self.kind == "transformer":
            return transformer_state(self.nbytes)
        if self.kind == "tiny":
            return tiny_state(self.nbytes)
        if self.kind == "optimizer":
            return optimizer_state(self.nbytes)
        raise ValueError(f"unknown state dict kind {self.kind!r}")


def parse_size(text: str) -> int:
    """``"1g"``, ``"512m"``, ``"64k"``, ``"1.5g"`` or a plain byte count."""
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    factor = {"k": 1 << 10, "m": MiB, "g": GiB}.get(text[-1:], 1)
    number = text[:-1] if factor != 1 else text
    return int(float(number) * factor)


def size_name(nbytes: int) -> str:
    if nbytes >= GiB and nbytes % GiB == 0:
        return f"{nbytes // GiB} GiB"
    if nbytes >= GiB:
        return f"{nbytes / GiB:.1f} GiB"
    return f"{nbytes / MiB:.0f} MiB"


def _filled(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, dtype=torch.float32).uniform_(-0.02, 0.02)


def _width(nbytes: int) -> int:
    if nbytes < 128 * MiB:
        return 256
    if nbytes <= 2 * GiB:
        return 1024
    return 2048


def transformer_state(nbytes: int) -> dict[str, torch.Tensor]:
    """fp32 weights of a transformer of about ``nbytes`` (realistic layer shapes)."""
    d = _width(nbytes)
    vocab = 32000 if nbytes >= 128 * MiB else 4096
    block_params = 12 * d * d + 13 * d  # qkv 3d²+3d, out d²+d, up 4d²+4d, down 4d²+d, 2 norms 4d
    budget_params = nbytes // 4 - 2 * vocab * d - 2 * d
    blocks = max(1, round(budget_params / block_params))
    state: dict[str, torch.Tensor] = {"tok_embeddings.weight": _filled(vocab, d)}
    for b in range(blocks):
        p = f"layers.{b}."
        state[p + "attn_norm.weight"] = torch.ones(d)
        state[p + "attn_norm.bias"] = torch.zeros(d)
        state[p + "attn.qkv.weight"] = _filled(3 * d, d)
        state[p + "attn.qkv.bias"] = _filled(3 * d)
        state[p + "attn.out.weight"] = _filled(d, d)
        state[p + "attn.out.bias"] = _filled(d)
        state[p + "mlp_norm.weight"] = torch.ones(d)
        state[p + "mlp_norm.bias"] = torch.zeros(d)
        state[p + "mlp.up.weight"] = _filled(4 * d, d)
        state[p + "mlp.up.bias"] = _filled(4 * d)
        state[p + "mlp.down.weight"] = _filled(d, 4 * d)
        state[p + "mlp.down.bias"] = _filled(d)
    state["norm.weight"] = torch.ones(d)
    state["norm.bias"] = torch.zeros(d)
    state["lm_head.weight"] = _filled(vocab, d)
    return state


def tiny_state(count: int) -> dict[str, torch.Tensor]:
    """``count`` float32 tensors of 16..256 elements."""
    sizes = [16, 32, 64, 128, 256]
    return {f"p.{i}": _filled(sizes[i % len(sizes)]) for i in range(count)}


def optimizer_state(nbytes: int) -> dict[str, Any]:
    """Model weights (a third of ``nbytes``) + Adam state for them, as Adam nests it."""
    model = transformer_state(nbytes // 3)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for i, weight in enumerate(model.values()):
        state[i] = {
            "step": torch.tensor(100.0),
            "exp_avg": _filled(*weight.shape),
            "exp_avg_sq": _filled(*weight.shape).abs_(),
        }
    groups = [
        {
            "lr": 3e-4,
            "betas": (0.9, 0.999),
            "eps": 1e-8,
            "weight_decay": 0.0,
            "amsgrad": False,
            "maximize": False,
            "foreach": None,
            "capturable": False,
            "differentiable": False,
            "fused": None,
            "params": list(range(len(model))),
        }
    ]
    return {"model": model, "optim": {"state": state, "param_groups": groups}}


# --- walking state dicts --------------------------------------------------------------------


def tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a nested state dict with a dotted key (``optim.state.3.exp_avg``)."""
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from tensors(v, f"{prefix}.{i}" if prefix else str(i))


def nbytes_of(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for _, t in tensors(tree))


def count_tensors(tree: Any) -> int:
    return sum(1 for _ in tensors(tree))


def flat_tensors(tree: Any) -> dict[str, torch.Tensor]:
    """The tensors of ``tree`` under dotted keys (what safetensors can store)."""
    return dict(tensors(tree))


def empty_like_tree(tree: Any) -> Any:
    """Same structure, fresh tensors (zeroed, so their pages are touched): the preallocated
    targets of in-place loads and of the memcpy limit."""
    return map_tensors(tree, lambda t: torch.zeros_like(t))


def map_tensors(tree: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return type(tree)((k, map_tensors(v, fn)) for k, v in tree.items())
    if isinstance(tree, list):
        return [map_tensors(v, fn) for v in tree]
    if isinstance(tree, tuple):
        return tuple(map_tensors(v, fn) for v in tree)
    return tree


def copy_into(dst: Any, src: Any) -> None:
    """``dst_tensor.copy_(src_tensor)`` for every tensor of two trees of the same structure."""
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, dict):
        for k, v in dst.items():
            copy_into(v, src[k])
    elif isinstance(dst, (list, tuple)):
        for d, s in zip(dst, src, strict=True):
            copy_into(d, s)


def copy_flat_into(dst: Any, flat: dict[str, torch.Tensor]) -> None:
    """Copy tensors keyed like :func:`flat_tensors` into the tensors of ``dst``."""
    for key, tensor in tensors(dst):
        tensor.copy_(flat[key])


def split(state: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """``state``'s tensors dealt into ``parts`` dicts of (nearly) equal bytes, largest first."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(parts)]
    load = [0] * parts
    for key, tensor in sorted(state.items(), key=lambda kv: -kv[1].numel()):
        lightest = load.index(min(load))
        out[lightest][key] = tensor
        load[lightest] += tensor.numel() * tensor.element_size()
    return out


def same_tensors(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of every tensor of two trees (a sanity check of each method)."""
    ta, tb = dict(tensors(a)), dict(tensors(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
