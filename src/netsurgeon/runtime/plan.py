"""What :func:`~netsurgeon.runtime.compile.compile_runtime` chose: a :class:`RunChoice` per timed run of layers
or whole-model step, gathered in a :class:`RuntimePlan`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["RunChoice", "RuntimePlan"]


@dataclass
class RunChoice:
    """One run of Linear layers: the candidates' median latency (ms) and the form kept."""

    layers: list[str]
    form: str
    weights: str  # float / shared / int8 / binary; none for a layer without weights (pooling)
    density: float
    latency_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class RuntimePlan:
    batch: int
    threads: int
    runs: list[RunChoice]
    traced: bool
    resident_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        lines = [f"runtime plan for batch {self.batch}, {self.threads} threads"
                 + ("" if self.traced else " (model not traceable by torch.fx: layers replaced one by one)")]
        for r in self.runs:
            cands = ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(r.latency_ms.items(), key=lambda kv: kv[1]))
            held = "" if r.weights == "none" else f" ({r.weights}, {100 * r.density:.1f}% nonzero)"
            lines.append(f"  {'+'.join(r.layers)}{held}: {r.form}"
                         + (f"  [{cands}]" if cands else ""))
        return "\n".join(lines)
