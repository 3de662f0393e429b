"""A plan as data and as text: its parts (bytes per rank, and how each is known: exact, measured,
estimate), its phases (what is alive together), the verdict against the GPU's memory, the advice,
and the few lines the trainer prints when it refuses a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastflow.plan.tensors import fmt


@dataclass
class Part:
    """One line of the plan: bytes per rank (rank 0, which holds the largest FSDP2 shards)."""

    key: str
    label: str
    bytes: int
    how: str = "exact"     # exact | measured | estimate
    note: str = ""


@dataclass
class Advice:
    """A setting that lowers the peak: as typed on the command line, and what was planned."""

    setting: str
    peak: int              # the planned peak with it
    saves: int
    fits: bool
    overrides: list[str] = field(default_factory=list)  # exactly the overrides that were planned
    world: int = 1


@dataclass
class Plan:
    header: list[str]
    parts: dict[str, Part]
    phases: dict[str, int]
    phase_parts: dict[str, list[str]]
    gpu_bytes: int | None
    gpu_label: str
    world: int
    strategy: str
    notes: list[str] = field(default_factory=list)
    advice: list[Advice] = field(default_factory=list)
    combined: Advice | None = None   # several settings together, when none fits alone

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def fits(self) -> bool:
        return self.gpu_bytes is None or self.peak <= self.gpu_bytes

    def render(self) -> str:
        lines = list(self.header)
        lines.append("")
        lines.append(f"per rank (rank 0){'':<47}{'bytes':>11}   how")
        for p in self.parts.values():
            note = f"  ({p.note})" if p.note else ""
            lines.append(f"  {p.label:<62}{fmt(p.bytes):>11}   {p.how}{note}")
        lines += [""] + [f"  note: {n}" for n in self.notes]
        lines.append("")
        lines.append("phases (what is alive together):")
        for ph, b in self.phases.items():
            mark = "  <- peak" if ph == self.peak_phase else ""
            lines.append(f"  {ph:<12}{fmt(b):>11}{mark}")
        lines.append("")
        lines.append(self.verdict())
        if not self.fits:
            lines += self.advice_lines()
        return "\n".join(lines)

    def verdict(self) -> str:
        if self.gpu_bytes is None:
            return f"peak {fmt(self.peak)} per rank ({self.peak_phase})"
        if self.fits:
            return (f"fits: peak {fmt(self.peak)} per rank ({self.peak_phase}) of {fmt(self.gpu_bytes)} "
                    f"({self.gpu_label}), {fmt(self.gpu_bytes - self.peak)} to spare")
        return (f"does not fit: peak {fmt(self.peak)} per rank ({self.peak_phase}) > {fmt(self.gpu_bytes)} "
                f"({self.gpu_label})")

    def advice_lines(self) -> list[str]:
        if not self.advice:
            return ["  no setting the plan knows brings it under the GPU's memory"]
        out = ["settings that bring it down (each alone; peak after):"]
        for a in self.advice:
            out.append(f"  {a.setting:<58} saves {fmt(a.saves):>11}  -> {fmt(a.peak)}"
                       f"{'  fits' if a.fits else ''}")
        if self.combined is not None and not any(a.fits for a in self.advice):
            c = self.combined
            out.append(f"  together: {c.setting}  -> {fmt(c.peak)}{'  fits' if c.fits else ' (still too much)'}")
        return out

    def refusal(self) -> str:
        """A few lines for the trainer's start-up refusal: the verdict, what would fit, how to see
        the full plan and how to start anyway."""
        lines = [f"fastflow: memory plan: {self.verdict()}"]
        fitting = [a for a in self.advice if a.fits]
        if fitting:
            lines.append("  it would fit with: " + "; or ".join(f"{a.setting} ({fmt(a.peak)})" for a in fitting[:3]))
        elif self.combined is not None and self.combined.fits:
            lines.append(f"  it would fit with: {self.combined.setting} ({fmt(self.combined.peak)})")
        else:
            lines.append("  no setting the plan knows makes it fit; see the full plan")
        lines.append("  full plan: python -m fastflow.train CONFIG --plan (same overrides); "
                     "--no-plan-check starts anyway")
        return "\n".join(lines)
