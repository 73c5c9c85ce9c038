"""``python -m simulations.audit [overrides]``: audit the privacy of one federated run.

Composes ``conf/audit.yaml`` (the main run config plus ``audit:``), runs the simulation with
canaries at one site, then the canary audits, membership inference and gradient inversion
(:mod:`simulations.audit.federated`); writes audit.json, audit.md and plots/ into the Hydra run
directory (the federated run's own report in ``federated/``).

Exit codes: 0 every check passed or informs; 2 a bad configuration or site data;
3 an empirical ε lower bound exceeds a site's accountant ε: the DP path is broken;
4 the auditing site never trained in the run (nothing was audited).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from rich.console import Console
from rich.markup import escape

from client.tasks import DataError
from server.settings import ConfigError, to_dict, validate
from simulations.audit.federated import AuditAborted, run_audit
from simulations.audit.report import FAIL, PASS, WARN, opening_sentence, write_audit_report

EXIT_AUDIT_FAILED = 3
EXIT_NOTHING_AUDITED = 4
console = Console(stderr=True)
_STYLE = {PASS: "green", FAIL: "bold red", WARN: "yellow"}


@hydra.main(config_path="../../conf", config_name="audit", version_base="1.3")
def main(hydra_cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        validate(hydra_cfg)
        report = run_audit(to_dict(hydra_cfg), out_dir)
    except (ConfigError, DataError) as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True)
        sys.exit(2)
    except AuditAborted as err:
        console.print(f"[bold red]audit aborted:[/] {escape(str(err))}", soft_wrap=True)
        sys.exit(EXIT_NOTHING_AUDITED)
    content = write_audit_report(report, out_dir)
    for verdict in content["verdicts"]:
        style = _STYLE.get(verdict["verdict"], "cyan")
        console.print(f"[{style}]{verdict['verdict']:>7}[/] {escape(verdict['check'])}: "
                      f"{escape(verdict['detail'])}", soft_wrap=True)
    for check, note in report.run["notes"].items():
        console.print(f"[dim]   note {escape(check)}: {escape(note)}[/]", soft_wrap=True)
    # the sentence audit.md opens with: what was protected, at what ε, and what was found
    console.print(escape(opening_sentence(report)), soft_wrap=True)
    console.print(f"audit done in {report.run['timings_s']['total_s']:.1f} s · "
                  f"report: {out_dir / 'audit.md'}")
    if report.failed:
        console.print("[bold red]AUDIT FAILED: an empirical ε lower bound exceeds the "
                      "accountant's ε; the DP path does not do what is accounted.[/]")
        sys.exit(EXIT_AUDIT_FAILED)


if __name__ == "__main__":
    main()
