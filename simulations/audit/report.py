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
                            "detail": f"AUC {attack.auc:.3f}, TPR@FPR 0.1% "
                                      f"{attack.tpr_at_fpr.get('0.001', math.nan):.3f}, TPR@FPR 1% "
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

    def dp_claim(self) -> tuple[float | None, float | None]:
        """(ε, δ) the auditing site's accountant claimed; (None, None) for a run without DP."""
        epsilon = self.run.get("accountant_epsilon")
        if epsilon is None:
            epsilon = next((c.accountant_epsilon for c in self.canaries
                            if c.accountant_epsilon is not None), None)
        if epsilon is None:
            return None, None
        delta = self.run.get("delta")
        if delta is None:
            delta = next((c.audit.delta for c in self.canaries), None)
        return float(epsilon), None if delta is None else float(delta)

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
        written.append(_save(epsilon_figure(report.canaries), plots / "audit_epsilon.png"))
    if report.membership:
        written.append(_save(roc_figure(report.membership), plots / "membership_roc.png"))
    if report.inversion:
        written.append(_save(inversion_figure(report), plots / "inversion.png"))
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


def opening_sentence(report: AuditReport) -> str:
    """audit.md's first sentence, for a privacy officer: what the run protected, at which ε
    (the auditing site's accountant; "without differential privacy" when off, never ε = 0), and
    whether the audit found a problem. No test names or statistics: those follow below."""
    run = report.run
    task = f" {run['task']}" if run.get("task") else ""
    site = run.get("auditing_site") or next((c.site for c in report.canaries), None)
    whose = f"{site}'s" if site else "the auditing hospital's"
    epsilon, delta = report.dp_claim()
    verdicts = report.verdicts()
    leaks = [v["check"].split("·")[-1].strip() for v in verdicts if v["verdict"] == WARN]
    if epsilon is None:
        found = []
        bounds = [c.audit.epsilon_lb for c in report.canaries]
        if bounds:
            found.append(f"the planted test records showed a privacy loss of at least "
                         f"ε = {max(bounds):.2f}")
        aucs = [a.auc for attacks in report.membership.values() for a in attacks]
        if aucs:
            found.append("the best attempt to tell training patients from other patients "
                         f"scored {max(aucs):.2f} (0.5 is a coin flip, 1 is certain)")
        if leaks:
            found.append("a protected update still gave away a recognisable image "
                         f"({', '.join(leaks)})")
        return (f"This audit attacked a federated{task} run without differential privacy, so "
                f"nothing protected the patient records in {whose} training data; what the "
                "attacks found is a measurement, not a limit: "
                + ("; ".join(found) if found else "no attack was run") + ".")
    claim = (f"This audit attacked a federated{task} run with differential privacy, in which "
             f"each patient record in {whose} training data is protected at ε = {epsilon:.2f}"
             + (f" (δ = {delta:.0e})" if delta is not None else "")
             + " according to that hospital's privacy accountant")
    if report.failed:
        return (claim + ", and it FOUND A PROBLEM: the attacks showed more leakage than that ε "
                "allows, so the privacy code does not do what it claims; do not rely on this "
                "protection.")
    if not report.canaries:
        return claim + ", but ran no check of that claim (the planted test records were off)" \
            + (f"; a protected update still gave away a recognisable image ({', '.join(leaks)})"
               if leaks else "") + "."
    if leaks:
        return (claim + ", and found no leakage beyond that ε, but a WARNING: a protected "
                f"update still gave away a recognisable image ({', '.join(leaks)}).")
    return (claim + ", and found no sign that the protection is weaker than claimed (which "
            "does not show it is as strong as claimed: see below).")


def _markdown(report: AuditReport, content: dict, plots: list[Path], out_dir: Path) -> str:
    lines = ["# Privacy audit", "", opening_sentence(report), ""]
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
        lines += ["", "The ε lower bound is the least privacy loss the guesses prove, at the "
                  "stated confidence; it stays valid although several guess counts were tried "
                  "(a Bonferroni correction: each is tested at confidence raised to cover all). "
                  "A bound far below the accountant's ε does not show the accountant is loose: "
                  "one-run audits are weak for few canaries."]
        if any(c.accountant_epsilon is None for c in report.canaries):
            lines += ["", "**Without DP a small lower bound is not privacy.** It is what these "
                      "attacks found at these sizes (a larger model, more canaries or another "
                      "optimizer may find more); nothing bounds what a stronger attack learns."]
    if report.membership:
        lines += ["", "## Membership inference (final global model)", "",
                  "AUC: how well the attack's score separates a site's training patients "
                  "(members) from its held-out ones (0.5 = coin flip, 1 = perfect). TPR @ FPR "
                  "0.1 %: the share of members the attack names correctly when it may wrongly "
                  "name only 0.1 % of non-members; the number that matters for naming "
                  "individual patients.", "",
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


def epsilon_figure(checks: list[CanaryCheck]) -> Any:
    """Accountant ε beside the measured lower bound per canary check. Every bar carries its
    value (a bound of 0.00 is a real result, not a missing bar) and the legend sits outside
    the axes, so it hides no bar; a run without DP shows "no DP" where the claim would be."""
    fig, ax = plt.subplots(figsize=(max(5.5, 1.6 * len(checks) + 2.5), 3.8))
    labels = [f"{c.site}\n{c.variant}" for c in checks]
    xs = list(range(len(checks)))
    claimed = [c.accountant_epsilon if c.accountant_epsilon is not None else math.nan
               for c in checks]
    bounds = [c.audit.epsilon_lb for c in checks]
    claim_bars = ax.bar([x - 0.2 for x in xs], claimed, width=0.4,
                        label="accountant ε (claimed)")
    bound_bars = ax.bar([x + 0.2 for x in xs], bounds, width=0.4,
                        label="ε lower bound (measured)")
    ax.bar_label(claim_bars, labels=[f"{v:.2f}" for v in claimed], fontsize=8, padding=2)
    for x, value in zip(xs, claimed, strict=True):
        if math.isnan(value):  # no bar to label: say why there is none
            ax.annotate("no DP", (x - 0.2, 0), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8)
    ax.bar_label(bound_bars, labels=[f"{v:.2f}" for v in bounds], fontsize=8, padding=2)
    finite = [v for v in claimed + bounds if math.isfinite(v)]
    ax.set_ylim(0, max([*finite, 0.5]) * 1.25)  # room for the labels above the bars
    ax.set_xlim(-0.6, len(checks) - 0.4)  # a NaN bar (no claim) adds no extent of its own
    ax.set_xticks(xs, labels)
    ax.set_xlabel("auditing site / canary variant")
    ax.set_ylabel("ε (privacy loss, unitless)")
    ax.set_title("Canary audit: claimed ε vs measured lower bound\n"
                 "(measured above claimed = the DP code is broken)", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return fig


def roc_figure(membership: dict[str, list[MembershipResult]]) -> Any:
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for site, attacks in membership.items():
        for a in attacks:
            ax.plot(a.fpr, a.tpr, label=f"{site} {a.attack} (AUC {a.auc:.2f})")
    ax.plot([1e-4, 1], [1e-4, 1], "k:", linewidth=0.8, label="chance (coin flip)")
    ax.set_xscale("log")  # the low-FPR regime is what matters (Carlini et al. 2022)
    ax.set_yscale("log")
    ax.set_xlabel("false positive rate (non-members named, fraction; log scale)")
    ax.set_ylabel("true positive rate\n(members named, fraction; log scale)")
    ax.set_title("Membership inference on the final global model", fontsize=10)
    ax.legend(fontsize=7)
    return fig


def inversion_figure(report: AuditReport) -> Any:
    panels = ([("truth", report.inversion_truth, None)] if report.inversion_truth is not None
              else []) + [(case, r.image, r.psnr) for case, r in report.inversion.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.5, 2 * len(panels)), 2.8))
    for ax, (name, image, value) in zip(list(axes) if len(panels) > 1 else [axes], panels):
        shown = image.detach().cpu()
        shown = shown[0] if shown.shape[0] == 1 else shown.permute(1, 2, 0)
        ax.imshow(shown.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name if value is None else f"{name}\nPSNR {value:.1f} dB", fontsize=8)
        ax.axis("off")  # pixels, not a measured quantity: no axes to label
    fig.suptitle("Gradient inversion: the image rebuilt from one update, per view the server "
                 "could get\n(PSNR vs the true image, in dB: higher = closer)", fontsize=9)
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # keeps a legend placed outside the axes
    plt.close(fig)
    return path
