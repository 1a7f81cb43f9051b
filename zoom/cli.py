"""`zoom` command line: demo, audit, report, compare, check.

Exit codes: 0 success, 1 a `check` that failed, 2 bad input (one line on stderr naming the problem and the fix, no
traceback, nothing half-written).
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
from pathlib import Path

import click

from .errors import ZoomError

DEMO_NOTICE = ("NOTE: the demo's models are tiny and RANDOMLY initialised; every number below is "
               "meaningless. It shows the pipeline end to end, offline.")


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


class ZoomGroup(click.Group):
    """Turns ZoomError (and click's own usage errors) into one line on stderr and exit code 2."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except ZoomError as e:
            click.echo(f"zoom: error: {e}", err=True)
            sys.exit(2)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("zoom: aborted", err=True)
            sys.exit(130)
        except _NO_ARGS_IS_HELP as e:  # bare `zoom`: help, not an error
            click.echo(e.format_message())
            sys.exit(0)
        except click.ClickException as e:
            click.echo(f"zoom: error: {e.format_message()}", err=True)
            sys.exit(2)


def _quiet_libraries():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _default_out(prefix: str) -> str:
    return f"{prefix}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


@click.group(cls=ZoomGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zoom")
def main():
    """zoom: which attributes flip your vision model, how often, how easily, and the images that did it."""


@main.command()
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Run directory to create (default: ./zoom-demo-DATE-TIME).")
def demo(out):
    """A full small audit on tiny random models, offline, on CPU."""
    from .config import load_config
    from .report import summary_table
    from .runner import run_audit
    from .tiny import build_tiny_models

    _quiet_libraries()
    out = out or _default_out("zoom-demo")
    click.echo(DEMO_NOTICE)
    paths = build_tiny_models()
    os.environ["ZOOM_TINY"] = str(paths["sd"].parent)
    config = load_config(Path(__file__).parent / "data" / "demo.yaml")
    report = run_audit(config, out)
    click.echo(summary_table(report))
    click.echo(DEMO_NOTICE)
    click.echo(f"report: {Path(out).resolve() / 'report.json'}")
    click.echo(f"open in a browser: {Path(out).resolve() / 'report.html'}")


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), required=True, help="Run config (YAML).")
@click.option("--target", help="Target spec, e.g. torchvision:resnet50:IMAGENET1K_V2 (overrides target.spec).")
@click.option("--prompts", help="Attribute set YAML (overrides prompts).")
@click.option("--samples", type=int, help="Seeds per attribute (overrides search.samples).")
@click.option("--mode", type=click.Choice(["single", "joint", "sweep"]), help="Search mode.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), help="Mixed precision.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run directory (default: runs/audit-DATE-TIME).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out, skipping finished items.")
@click.option("--trust-remote-code", is_flag=True, help="Allow hf: targets to run code from their repository.")
@click.option("--num-processes", type=click.IntRange(min=1), default=1,
              help="Run on K processes (one per GPU) through `accelerate launch`.")
def audit(config_path, target, prompts, samples, mode, precision, out, resume, trust_remote_code, num_processes):
    """Audit a target model's sensitivity to the attributes of a prompt set."""
    from .config import load_config
    from .report import summary_table
    from .runner import prepare_run_dir, run_audit

    if resume and not out:
        raise ZoomError("--resume needs --out RUN_DIR: the run directory to continue")
    overrides = {"target.spec": target, "prompts": prompts, "search.samples": samples, "search.mode": mode,
                 "precision": precision, "target.trust_remote_code": True if trust_remote_code else None}
    config = load_config(config_path, overrides)
    _quiet_libraries()
    out = out or os.path.join("runs", _default_out("audit"))
    if num_processes > 1 and "WORLD_SIZE" not in os.environ:
        prepare_run_dir(out, config, resume)  # bad input fails here, once, before K processes start
        args = ["audit", "--config", config_path, "--out", out]
        for flag, value in [("--target", target), ("--prompts", prompts), ("--samples", samples),
                            ("--mode", mode), ("--precision", precision)]:
            if value is not None:
                args += [flag, str(value)]
        args += ["--resume"] * resume + ["--trust-remote-code"] * trust_remote_code
        sys.exit(_launch(num_processes, config, args))
    report = run_audit(config, out, resume=resume)
    if report is not None:
        click.echo(summary_table(report))
        click.echo(f"report: {Path(out).resolve() / 'report.json'}")


def _launch(num_processes: int, config, args: list[str]) -> int:
    """Re-run this audit as K processes through accelerate's launcher; returns its exit code."""
    import subprocess

    import torch

    env = dict(os.environ)
    if config.device == "cpu" or not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"  # without it each CPU process would believe it is alone
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "zoom", *args]
    return subprocess.run(command, env=env).returncode


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
def report(run_dir):
    """Rebuild report.json, report.csv and report.html of RUN_DIR from its records (no models needed)."""
    from .report import summary_table, write_report

    if not os.path.isdir(run_dir):
        raise ZoomError(f"run directory {run_dir!r} does not exist")
    rebuilt = write_report(run_dir)
    click.echo(summary_table(rebuilt))
    click.echo(f"report: {Path(run_dir).resolve() / 'report.json'}")
    click.echo(f"open in a browser: {Path(run_dir).resolve() / 'report.html'}")


@main.command()
@click.argument("run_a", type=click.Path())
@click.argument("run_b", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON instead of a table.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the comparison as a self-contained HTML page to this file.")
def compare(run_a, run_b, as_json, html_path):
    """Compare the flip rates of the same attributes in two runs (B - A), with a test per attribute."""
    import json

    from .compare import compare_runs, compare_table

    if html_path and os.path.isdir(html_path):
        raise ZoomError(f"--html {html_path!r} is a directory; give a file name such as compare.html")
    result = compare_runs(run_a, run_b)
    if html_path:
        from .report.html import render_compare
        from .rundir import atomic_write

        if not Path(html_path).resolve().parent.is_dir():
            raise ZoomError(f"--html {html_path!r}: its folder does not exist")
        atomic_write(Path(html_path), render_compare(result))
    if as_json:
        click.echo(json.dumps(result, indent=1, allow_nan=False))
    else:
        click.echo(compare_table(result))
        if html_path:
            click.echo(f"html: {Path(html_path).resolve()}")


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--max-flip-rate", "max_flip_rate", required=True, metavar="R",
              help="Fail when an attribute's flip rate is significantly above the null and its 95% lower bound exceeds R (0..1).")
@click.option("--attribute", "attributes", multiple=True, metavar="NAME",
              help="Check only this attribute (repeatable); default: all.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
def check(run_dir, max_flip_rate, attributes, as_json):
    """A pre-deployment gate: exit 1 (and say why) when an attribute's flip rate is too high, else 0."""
    import json

    from .check import check_run, check_text

    result = check_run(run_dir, max_flip_rate, list(attributes) or None)
    click.echo(json.dumps(result, indent=1, allow_nan=False) if as_json else check_text(result))
    if not result["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
