"""The audit report: audit.json (machines), audit.md (privacy officers), plots/, verdicts.

A DP run whose empirical ε lower bound exceeds the accountant's ε is a bug in the DP path (the
bound holds with the stated confidence whenever the accounted mechanism is what ran): the report
says so first and :attr:`AuditReport.failed` is True, so the command can exit non-zero.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from simulations.audit.inversion import Reconstruction  # noqa: E402
from simulations.audit.lower_bound import AuditResult  # noqa: E402
from simulations.audit.membership import MembershipResult  # noqa: E402

PASS, FAIL, INFO, WARN = "pass", "FAIL", "info", "warning"


@dataclass(frozen=True)
class CanaryCheck:
    """One site's canary audit: what the accountant claims beside what the audit measured."""

    site: str
    variant: str  # "white-box" | "black-box"
    audit: AuditResult
    accountant_epsilon: float | None  # None: the run had no DP, nothing was claimed


@dataclass
class AuditReport:
    canaries: list[CanaryCheck] = field(default_factory=list)
    membership: dict[str, list[MembershipResult]] = field(default_factory=dict)  # site → attacks
    inversion: dict[str, Reconstruction] = field(default_factory=dict)  # case → reconstruction
    inversion_truth: torch.Tensor | None = None
    run: dict[str, Any] = field(default_factory=dict)  # config, timings

    def verdicts(self) -> list[dict[str, str]]:
        out = []
        for check in self.canaries:
            name = f"canaries {check.variant} · {check.site}"
            lb = check.audit.epsilon_lb
            if check.accountant_epsilon is None:
                out.append({"check": name, "verdict": INFO,
                            "detail": f"no DP claimed; measured ε ≥ {lb:.2f}"})
            elif lb > check.accountant_epsilon:
                out.append({"check": name, "verdict": FAIL, "detail": (
                    f"ε lower bound {lb:.2f} > accountant ε {check.accountant_epsilon:.2f} at "
                    f"{check.audit.confidence:.0%} confidence: the DP path does not do what "
                    "is accounted (noise, clipping, sampling or the ledger is broken)")})
            else:
                out.append({"check": name, "verdict": PASS, "detail": (
                    f"ε lower bound {lb:.2f} ≤ accountant ε {check.accountant_epsilon:.2f}")})
        for site, attacks in self.membership.items():
            for attack in attacks:
                out.append({"check": f"membership {attack.attack} · {site}", "verdict": INFO,
                            "detail": f"AUC {attack.auc:.3f}, TPR@0.1% "
                                      f"{attack.tpr_at_fpr.get('0.001', math.nan):.3f}, TPR@1% "
                                      f"{attack.tpr_at_fpr.get('0.01', math.nan):.3f}"})
        for case, rec in self.inversion.items():
            leaks = rec.beats_baseline
            verdict = INFO if case == "plaintext" else (WARN if leaks else PASS)
            out.append({"check": f"inversion · {case}", "verdict": verdict,
                        "detail": f"PSNR {rec.psnr:.1f} dB vs flat image {rec.baseline_psnr:.1f} dB"
                                  + (" (recognisable)" if leaks else " (nothing beyond flat)")})
        return out

    @property
    def failed(self) -> bool:
        return any(v["verdict"] == FAIL for v in self.verdicts())

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "failed": self.failed,
            "verdicts": self.verdicts(),
            "canaries": [{"site": c.site, "variant": c.variant,
                          "accountant_epsilon": c.accountant_epsilon, **c.audit.to_dict()}
                         for c in self.canaries],
            "membership": {site: [a.summary() for a in attacks]
                           for site, attacks in self.membership.items()},
            "inversion": {case: {"psnr_db": r.psnr, "flat_baseline_psnr_db": r.baseline_psnr,
                                 "label": r.label, "gradient_distance": r.gradient_distance,
                                 "seconds": r.seconds}
                          for case, r in self.inversion.items()},
        }


def write_audit_report(report: AuditReport, out_dir: Path) -> dict[str, Any]:
    """Write audit.json, audit.md and plots/ under ``out_dir``; returns the JSON content."""
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    content = report.to_dict()
    (out_dir / "audit.json").write_text(json.dumps(_json_safe(content), indent=2,
                                                   allow_nan=False))
    written = []
    if report.canaries:
        written.append(_plot_epsilons(report.canaries, plots / "audit_epsilon.png"))
    if report.membership:
        written.append(_plot_roc(report.membership, plots / "membership_roc.png"))
    if report.inversion:
        written.append(_plot_inversion(report, plots / "inversion.png"))
    (out_dir / "audit.md").write_text(_markdown(report, content, written, out_dir))
    return content


def _json_safe(value: Any) -> Any:
    """Strict JSON: a non-finite number (an exact reconstruction's PSNR is inf) becomes null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _markdown(report: AuditReport, content: dict, plots: list[Path], out_dir: Path) -> str:
    lines = ["# Privacy audit", ""]
    if report.failed:
        lines += ["> **FAILED: an empirical ε lower bound exceeds the accountant's ε. The DP path "
                  "does not implement what is accounted; do not rely on the stated guarantee.**",
                  ""]
    lines += ["| check | verdict | detail |", "|---|---|---|"]
    lines += [f"| {v['check']} | {v['verdict']} | {v['detail']} |" for v in content["verdicts"]]
    if report.canaries:
        lines += ["", "## Canary audit (Steinke, Nasr, Jagielski 2023, one run)", "",
                  "| site | variant | accountant ε | ε lower bound | m | guesses | correct | "
                  "confidence | paper's convention (best k, uncorrected) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in report.canaries:
            claimed = "—" if c.accountant_epsilon is None else f"{c.accountant_epsilon:.2f}"
            a = c.audit
            lines.append(f"| {c.site} | {c.variant} | {claimed} | {a.epsilon_lb:.2f} | {a.m} | "
                         f"{a.guesses} | {a.correct} | {a.confidence:.0%} | "
                         f"{a.epsilon_lb_best_uncorrected:.2f} |")
        lines += ["", "The lower bound holds with the stated confidence (Bonferroni over the "
                  "guess counts tried). A bound far below the accountant's ε does not show the "
                  "accountant is loose: one-run audits are weak for few canaries."]
        if any(c.accountant_epsilon is None for c in report.canaries):
            lines += ["", "**Without DP a small lower bound is not privacy.** It is what these "
                      "attacks found at these sizes (a larger model, more canaries or another "
                      "optimizer may find more); nothing bounds what a stronger attack learns."]
    if report.membership:
        lines += ["", "## Membership inference (final global model)", "",
                  "| site | attack | AUC | TPR @ FPR 0.1% | TPR @ FPR 1% | members | non-members |",
                  "|---|---|---|---|---|---|---|"]
        for site, attacks in report.membership.items():
            for a in attacks:
                lines.append(f"| {site} | {a.attack} | {a.auc:.3f} | {a.tpr_at_fpr['0.001']:.3f} "
                             f"| {a.tpr_at_fpr['0.01']:.3f} | {a.members} | {a.non_members} |")
    if report.inversion:
        lines += ["", "## Gradient inversion (one site's update as the server sees it)", "",
                  "| case | PSNR (dB) | flat image (dB) | seconds |", "|---|---|---|---|"]
        for case, r in report.inversion.items():
            lines.append(f"| {case} | {r.psnr:.1f} | {r.baseline_psnr:.1f} | {r.seconds:.1f} |")
    if timings := report.run.get("timings_s"):
        lines += ["", "## Time (seconds, wall clock)", "", "| phase | seconds |", "|---|---|"]
        lines += [f"| {phase.removesuffix('_s')} | {seconds:.1f} |"
                  for phase, seconds in timings.items()]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{p.stem}]({p.relative_to(out_dir)})" for p in plots]
    return "\n".join(lines) + "\n"


def _plot_epsilons(checks: list[CanaryCheck], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(checks)), 3.2))
    labels = [f"{c.site}\n{c.variant}" for c in checks]
    xs = range(len(checks))
    claimed = [c.accountant_epsilon if c.accountant_epsilon is not None else math.nan
               for c in checks]
    ax.bar([x - 0.2 for x in xs], claimed, width=0.4, label="accountant ε")
    ax.bar([x + 0.2 for x in xs], [c.audit.epsilon_lb for c in checks], width=0.4,
           label="empirical ε lower bound")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("ε")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_roc(membership: dict[str, list[MembershipResult]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    for site, attacks in membership.items():
        for a in attacks:
            ax.plot(a.fpr, a.tpr, label=f"{site} {a.attack} (AUC {a.auc:.2f})")
    ax.plot([1e-4, 1], [1e-4, 1], "k:", linewidth=0.8)
    ax.set_xscale("log")  # the low-FPR regime is what matters (Carlini et al. 2022)
    ax.set_yscale("log")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_inversion(report: AuditReport, path: Path) -> Path:
    panels = ([("truth", report.inversion_truth, None)] if report.inversion_truth is not None
              else []) + [(case, r.image, r.psnr) for case, r in report.inversion.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(2 * len(panels), 2.3))
    for ax, (name, image, value) in zip(list(axes) if len(panels) > 1 else [axes], panels):
        shown = image.detach().cpu()
        shown = shown[0] if shown.shape[0] == 1 else shown.permute(1, 2, 0)
        ax.imshow(shown.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name if value is None else f"{name}\n{value:.1f} dB", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
