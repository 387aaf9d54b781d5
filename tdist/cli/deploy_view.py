"""How `deploy`, `stop` and `status` look: the launcher's events rendered with rich, the ready
table, and the status table.

The launchers (tdist/launch) do the work and report through `LaunchEvents`; this module only
renders: a spinner with progress on stderr, the table of workers once the deployment is ready,
one line per note on stdout.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.status import Status
from rich.table import Table

from tdist.launch.base import LaunchEvents


class CliEvents(LaunchEvents):
    """LaunchEvents for a terminal: phases and progress as a spinner, results as text and tables."""

    def __init__(self, out: Console, err: Console) -> None:
        self.out = out
        self.err = err
        self._status: Status | None = None
        self._phase = ""

    def _end_status(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def note(self, text: str) -> None:
        self.out.print(text) if text.startswith("submitted") else self.err.print(f"[dim]{text}[/]")

    def warn(self, text: str) -> None:
        self.err.print(f"[bold yellow]warning:[/] {escape(text)}")

    def phase(self, text: str) -> None:
        self._phase = text
        if self._status is None:
            self._status = self.err.status(text)
            self._status.start()
        else:
            self._status.update(text)

    def progress(self, ready: int, total: int, waiting: str) -> None:
        if self._status is not None:
            self._status.update(f"{self._phase}: {ready}/{total} workers ready" + (f" (waiting: {waiting})" if waiting else ""))

    def ready(self, record: Any) -> None:
        self._end_status()
        print_deployed(self.out, record)
        if record.options.detach or record.launcher == "sbatch":
            how = f"supervisor pid {record.supervisor.pid}" if record.supervisor else f"job {record.slurm.job_id}"
            self.out.print(f"detached ({how}); run dir {record.run_dir}\n"
                           "  tdist status · tdist infer --component NAME ... · tdist stop")
        else:
            self.out.print("serving; Ctrl-C (or `tdist stop`) stops everything")

    def done(self, text: str) -> None:
        self._end_status()
        self.out.print(text)


def print_deployed(out: Console, record: Any) -> None:
    """The table `deploy` prints once every worker is ready (any launcher)."""
    launcher = f" ({record.launcher})" if record.launcher != "local" else ""
    t = Table(title=f"deployment {record.deployment} ready{launcher}", title_justify="left")
    for col in ("component", "worker", "pid", "log"):
        t.add_column(col)
    for w in record.workers.values():
        t.add_row(w.component, w.name, str(w.pid), w.log or "")
    out.print(t)
    out.print(f"request plane: {record.nats.url}" + (" (embedded)" if record.nats.embedded else ""))
    if record.slurm.job_id:
        out.print(f"job: {record.slurm.job_id}")
    elif record.world is not None:
        out.print(f"{record.launcher} pid: {record.world.pid}")


def status_table(deployment: str, run_state: str, nats_url: str | None, components: dict[str, dict[str, Any]]) -> Table:
    """The status table, without columns that carry nothing here (one host → in the title; no
    ranks, restarts or LLM figures → no column; component only where worker names don't say it),
    so it stays readable in an 80-column terminal."""
    from rich import box

    workers = [w for v in components.values() for w in v["workers"]]
    hosts = sorted({str(w["host"]) for w in workers})
    llm = {w["name"]: llm_cell(w["operators"]) for w in workers}
    show = {
        "component": any(not str(w["name"]).startswith(f"{c}.") for c, v in components.items() for w in v["workers"])
        or any(not v["workers"] for v in components.values()),
        "host": len(hosts) > 1,
        "rank": any(w["rank"] is not None for w in workers),
        "restarts": any(w["restarts"] for w in workers),
        "llm": any(llm.values()),
    }
    title = f"{deployment} ({run_state}) · {nats_url}" + (f" · host {hosts[0]}" if len(hosts) == 1 else "")
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 0), pad_edge=False)
    cols = [c for c in ("component", "worker", "state", "host", "pid", "rank", "in-flight", "served", "errors",
                        "up", "heartbeat", "restarts", "llm") if show.get(c, True)]
    for col in cols:
        t.add_column(col, justify="right" if col in ("pid", "rank", "in-flight", "served", "errors", "restarts") else "left",
                     no_wrap=col in ("worker", "state"), min_width=len(col) if col != "llm" else None)
    for comp, v in components.items():
        if not v["workers"]:
            row = {"component": comp, "worker": "—", "state": "[red]no worker[/]"}
            t.add_row(*(row.get(c, "") for c in cols))
        for w in v["workers"]:
            color = {"ready": "green", "starting": "yellow", "draining": "yellow"}.get(w["state"], "red")
            row = {"component": comp, "worker": w["name"], "state": f"[{color}]{w['state']}[/]", "host": str(w["host"]),
                   "pid": str(w["pid"]), "rank": "" if w["rank"] is None else str(w["rank"]), "in-flight": str(w["inflight"]),
                   "served": str(w["served"]), "errors": str(w["errors"]), "up": f"{w['uptime_s']:.0f}s",
                   "heartbeat": f"{w['heartbeat_age_s']:.1f}s", "restarts": str(w["restarts"]), "llm": llm[w["name"]]}
            t.add_row(*(row[c] for c in cols))
    return t


def llm_cell(per_operator: dict[str, Any]) -> str:
    """LLM engine figures of a worker for the status table (issue 9): role, KV-cache use, prefix
    hit rate — from the operator's stats() in its discovery entry; empty for other operators."""
    cells = []
    for st in (v.get("stats") or {} for v in (per_operator or {}).values() if isinstance(v, dict)):
        if "kv_cache_usage" in st or st.get("engine"):
            cells.append(f"{st.get('role', 'both')} · kv {100 * float(st.get('kv_cache_usage', 0) or 0):.0f}% · "
                         f"prefix hit {100 * float(st.get('prefix_cache_hit_rate', 0) or 0):.0f}%")
        elif isinstance(st.get("disagg"), dict):  # a disaggregating router: its decisions
            d = st["disagg"].get("decisions", {})
            cells.append(f"remote prefill {d.get('remote_prefill', 0)} · local {sum(v for k, v in d.items() if k.startswith('local'))}")
    return "; ".join(cells)
