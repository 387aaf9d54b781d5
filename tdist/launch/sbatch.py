"""`--launcher sbatch`: the plan's batch script, submitted to Slurm; Slurm runs the deployment.

`start` writes the script (`emit_sbatch`, exactly what `tdist plan --launcher sbatch --format
script` prints) to `<run>/job.sbatch`, submits it, waits until the job runs and every worker is
ready in discovery, and records the job. The batch script itself starts NATS (and etcd), the
service workers and the world; nothing here supervises (Slurm does), so `--no-restart` changes
nothing for sbatch: no worker is restarted. `stop` drains the world step, scancels the job, waits
until squeue no longer lists it, and splits the job's labelled output into one log per worker.
"""

from __future__ import annotations

import asyncio
import os

from tdist.errors import LaunchError
from tdist.launch import slurm
from tdist.launch.base import LaunchEvents, Launcher
from tdist.launch.logs import tail_file
from tdist.launch.readiness import wait_ready_in_discovery
from tdist.launch.rundir import ProcessRecord, RunRecord


class SbatchLauncher(Launcher):
    kind = "sbatch"

    def _start(self, record: RunRecord, events: LaunchEvents) -> RunRecord:
        from tdist.runtime.config import DiscoveryConfig

        plan = self.plan
        env = slurm.sbatch_env()
        job_id = slurm.submit_sbatch(self.dry_run(), record.run_dir, env=env)
        record.slurm.job_id = job_id
        record.slurm.output = plan.srun.output.replace("%j", job_id)
        record.slurm.conf = env.get("SLURM_CONF")
        record.save()
        events.note(f"submitted batch job {job_id}")
        output = record.slurm.output
        try:
            events.phase(f"job {job_id}: waiting to run")
            nodes = slurm.wait_job_running(job_id, env=env, timeout_s=self.options.startup_timeout_s, log_path=output)
            record.slurm.nodes = nodes
            given = self.options.nats_url or plan.nats.url  # else the batch script's nats-server
            record.nats.url = given or slurm.head_node_url(nodes, "nats", plan.srun.nats_port)
            record.nats.embedded = given is None
            if plan.etcd is not None:
                if plan.etcd.embedded:  # the batch script's etcd on the batch host
                    record.etcd.endpoints = [slurm.head_node_url(nodes, "http", plan.srun.etcd_port)]
                else:
                    record.etcd.endpoints = list(plan.etcd.endpoints) or [
                        e for e in os.environ.get("ETCD_ENDPOINTS", "").split(",") if e]
            record.save()

            def check() -> None:
                if not slurm.job_active(job_id, env=env):
                    raise LaunchError(f"Slurm job {job_id} ended during start", log_tail=tail_file(output), log_path=output)

            disc = DiscoveryConfig(kind=plan.discovery, etcd_endpoints=record.etcd.endpoints)  # type: ignore[arg-type]
            events.phase(f"job {job_id} on {', '.join(nodes)}: waiting for {len(plan.workers)} workers")
            entries = asyncio.run(wait_ready_in_discovery(
                record.nats.url, plan.deployment, disc, set(record.workers), timeout_s=self.options.startup_timeout_s,
                log_of=lambda name: output, check=check, progress=events.progress))
        except BaseException as exc:
            record.state = "failed"
            record.error = exc.render() if isinstance(exc, LaunchError) else f"{type(exc).__name__}: {exc}"
            record.save()
            try:
                slurm.cancel_job(job_id, env=env, timeout_s=30)
            except LaunchError:
                pass
            raise
        for name, e in entries.items():
            if name in record.workers and e.get("pid"):
                record.workers[name].process = ProcessRecord.of(int(e["pid"]), host=e.get("host"))
                record.workers[name].state = "ready"
        record.state = "ready"
        record.save()
        events.ready(record)
        return record

    def _env(self) -> dict[str, str]:
        assert self.record is not None
        env = dict(os.environ)
        if self.record.slurm.conf and not env.get("SLURM_CONF"):
            env["SLURM_CONF"] = self.record.slurm.conf
        return env

    def stop(self, *, timeout_s: float = 60.0, events: LaunchEvents | None = None) -> list[str]:
        assert self.record is not None
        events = events or LaunchEvents()
        rec = self.record
        forced: list[str] = []
        job = rec.slurm.job_id
        events.phase(f"stopping {rec.deployment}: scancel {job}")
        if job and not slurm.cancel_job(job, env=self._env(), timeout_s=timeout_s, drain_s=min(30.0, timeout_s)):
            forced.append(f"job {job} still listed by squeue")
        if rec.slurm.output:
            slurm.split_rank_output(rec.slurm.output, {w.rank: w.log for w in rec.workers.values()
                                                       if w.rank is not None and w.rank < self.plan.world_size and w.log})
        rec = rec.reload()
        rec.state = "stopped"
        for w in rec.workers.values():
            w.state = "stopped"
        rec.save()
        self.record = rec
        if forced:
            events.note(f"forced: {', '.join(forced)}")
        events.done(f"stopped {rec.deployment}")
        return forced
