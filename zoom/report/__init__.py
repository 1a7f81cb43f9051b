"""From records to the sensitivity report: report.json, report.csv, report.html and the terminal table.

Everything here reads only the run directory (records, config.yaml, run.json), so `zoom report
RUN_DIR` rebuilds the report without loading a model.
"""

from .aggregate import SCHEMA_VERSION, aggregate, build_report, load_run, summary_table, write_report

__all__ = ["SCHEMA_VERSION", "aggregate", "build_report", "load_run", "summary_table", "write_report"]
