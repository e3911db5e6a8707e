"""What a training run does around its steps: fault injection, evaluation, logging, checkpoints.

Each is a small object the loop calls in a fixed order after a step (`FaultInjection` before
it): `LossLog` reads the step's loss and gradient norm back to the host, checks the loss is
finite, keeps the history and the throughput; `Evaluation` computes the validation loss every
`eval_every` steps; `ProgressLog` shows them (with MFU, perplexity and bits per byte) and
appends them to metrics.jsonl; `Checkpointing` saves every `save_every` steps and at the end,
with the run's tokenizer.json.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

from protoformer.distributed import LaunchEnvironment
from protoformer.flops import flops_per_token
from protoformer.interop.hf_tokenizer import TOKENIZER_FILE
from protoformer.train.checkpoint import save_checkpoint
from protoformer.train.checkpoint_dcp import PendingSave, start_sharded_checkpoint
from protoformer.train.checkpoint_dist import save_distributed_checkpoint
from protoformer.train.dataset import bits_per_byte
from protoformer.train.loss import evaluate, evaluate_pipeline
from protoformer.train.metrics import MetricsLog, memory_gib, peak_flops, perplexity
from protoformer.train.progress import TrainProgress
from protoformer.train.run_state import rng_state, run_state
from protoformer.train.setup import TrainRun
from protoformer.train.step import StepOutput

__all__ = [
    "FAULT_INJECTION_VARIABLE",
    "Checkpointing",
    "Evaluation",
    "FaultInjection",
    "LossLog",
    "ProgressLog",
    "StepReport",
    "Throughput",
    "Utilization",
]

FAULT_INJECTION_VARIABLE = "PROTOFORMER_FAULT_INJECT"
"""`rank=R,step=S`: rank R raises at step S (to test that one rank's failure ends the job);
`rank=R,step=S,action=stop`: rank R stops itself with SIGSTOP instead (a hung rank: alive,
stuck, deaf to SIGTERM), to test that the watchdog ends the job."""


@dataclass(frozen=True)
class StepReport:
    """A completed step as the hooks see it (host values)."""

    step: int  # steps completed, counting this one
    loss: float
    lr: float
    grad_norm: float
    tokens_per_second: float  # over the recent steps
    validation_loss: float | None = None
    aux_loss: float | None = None  # a mixture-of-experts model's auxiliary losses


class FaultInjection:
    """Raise (or stop) on this rank at the step `PROTOFORMER_FAULT_INJECT` names (tests a
    failing or a hung rank)."""

    def __init__(self, launch: LaunchEnvironment) -> None:
        self._launch = launch
        self.step, self.stop = self._parse(launch)

    @staticmethod
    def _parse(launch: LaunchEnvironment) -> tuple[int | None, bool]:
        text = os.environ.get(FAULT_INJECTION_VARIABLE, "").strip()
        if not text:
            return None, False
        fields = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
        try:
            rank, step = int(fields["rank"]), int(fields["step"])
        except (KeyError, ValueError):
            raise ValueError(f"{FAULT_INJECTION_VARIABLE}={text!r}: expected "
                             "rank=R,step=S[,action=raise|stop]") from None
        action = fields.get("action", "raise")
        if action not in ("raise", "stop"):
            raise ValueError(f"{FAULT_INJECTION_VARIABLE}={text!r}: action is raise or stop")
        return (step if rank == launch.rank else None), action == "stop"

    def before_step(self, step: int) -> None:
        """`step` counts the steps completed before this one."""
        if self.step is not None and step + 1 == self.step:
            if self.stop:
                os.kill(os.getpid(), signal.SIGSTOP)  # every thread of this rank stops here
                return
            raise RuntimeError(f"fault injected on rank {self._launch.rank} at step {self.step} "
                               f"({FAULT_INJECTION_VARIABLE})")


class Throughput:
    """Tokens per second: over the recent steps, since the last report, and overall."""

    def __init__(self) -> None:
        self.recent: deque[tuple[int, float]] = deque(maxlen=20)
        self.tokens = 0
        self.seconds = 0.0
        self.total_tokens = 0
        self.total_seconds = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.recent.append((tokens, seconds))
        self.tokens += tokens
        self.seconds += seconds
        self.total_tokens += tokens
        self.total_seconds += seconds

    def recent_rate(self) -> float:
        seconds = sum(s for _, s in self.recent)
        return sum(t for t, _ in self.recent) / seconds if seconds > 0 else 0.0

    def take(self) -> float:
        """The rate since the previous `take`."""
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        self.tokens, self.seconds = 0, 0.0
        return rate

    def mean_rate(self) -> float:
        return self.total_tokens / self.total_seconds if self.total_seconds > 0 else 0.0


class LossLog:
    """Reads a step's results to the host, refuses a non-finite loss, keeps the history."""

    def __init__(self, run: TrainRun) -> None:
        self._run = run
        self.throughput = Throughput()
        self._tokens_per_step = run.options.batch_size * run.options.seq_len

    def record(self, step: int, output: StepOutput, lr: float, started: float) -> StepReport:
        """`step` counts the steps completed with this one; `started` is its perf_counter."""
        loss = float(output.loss)  # the step's one host synchronisation
        grad_norm = float(output.grad_norm)
        self.throughput.add(self._tokens_per_step, time.perf_counter() - started)
        if not math.isfinite(loss):
            raise ValueError(f"the training loss became {loss} at step {step}; lower the "
                             f"learning rate (--lr, now {self._run.options.lr})")
        self._run.train_losses.append((step, loss))
        aux = None if output.aux_loss is None else float(output.aux_loss)
        return StepReport(step=step, loss=loss, lr=lr, grad_norm=grad_norm,
                          tokens_per_second=self.throughput.recent_rate(), aux_loss=aux)


def _is_due(step: int, every: int, last: int) -> bool:
    return step % every == 0 or step == last


class Evaluation:
    """The validation loss every `eval_every` steps and at the last (on every rank)."""

    def __init__(self, run: TrainRun) -> None:
        self._run = run

    def after_step(self, report: StepReport) -> StepReport:
        run = self._run
        if not _is_due(report.step, run.options.eval_every, run.options.steps):
            return report
        if run.pipeline is not None:
            loss = evaluate_pipeline(run.pipeline, run.validation, run.device, run.pg)
        else:
            loss = evaluate(run.model, run.validation, run.device, run.pg)
        run.validation_losses.append((report.step, loss))
        return replace(report, validation_loss=loss)


class Utilization:
    """Model FLOPs utilisation: `flops_per_token` x tokens/s over the peak of every device."""

    def __init__(self, run: TrainRun) -> None:
        model = run.model
        self.flops_per_token = flops_per_token(model.config, model.vocab_size,
                                               run.options.seq_len)
        self.peak = peak_flops(run.device, bf16=run.bf16,
                               override_tflops=run.options.peak_tflops)
        self.devices = run.launch.world_size

    def mfu(self, tokens_per_second: float) -> float | None:
        """None when the device's peak is unknown (a CPU without --peak-tflops)."""
        if self.peak is None:
            return None
        return self.flops_per_token * tokens_per_second / (self.peak * self.devices)


class ProgressLog:
    """Shows each step on the progress bar, and a log line (and a metrics.jsonl line) every
    `log_every` steps; a validation loss on another step gets its own line."""

    def __init__(self, run: TrainRun, progress: TrainProgress, throughput: Throughput,
                 metrics: MetricsLog) -> None:
        self._options = run.options
        self._progress = progress
        self._throughput = throughput
        self._metrics = metrics
        self._utilization = Utilization(run)
        self._device = run.device
        self._bytes_per_token = run.data.bytes_per_token
        self._started = time.perf_counter()

    def after_step(self, report: StepReport) -> None:
        options, progress = self._options, self._progress
        logged = _is_due(report.step, options.log_every, options.steps)
        rate = self._throughput.take() if logged else report.tokens_per_second
        mfu = self._utilization.mfu(rate)
        if logged:
            progress.report(report.step, report.loss, report.lr, rate, report.validation_loss,
                            report.aux_loss, mfu=mfu)
            self._metrics.write({
                "step": report.step, "loss": report.loss, "lr": report.lr,
                "grad_norm": report.grad_norm, "tokens_per_second": rate, "mfu": mfu,
                "memory_gib": memory_gib(self._device),
                "elapsed_seconds": time.perf_counter() - self._started,
                **({} if report.aux_loss is None else {"aux_loss": report.aux_loss}),
                **self._validation(report)})
        else:
            progress.advance(report.step, report.loss, report.lr, rate, report.aux_loss, mfu=mfu)
        if report.validation_loss is not None and not logged:
            progress.validation(report.step, report.validation_loss)
            self._metrics.write({"step": report.step, **self._validation(report)})

    def _validation(self, report: StepReport) -> dict[str, float | int | None]:
        loss = report.validation_loss
        if loss is None:
            return {}
        return {"validation_loss": loss, "validation_perplexity": perplexity(loss),
                "validation_bits_per_byte": bits_per_byte(loss, self._bytes_per_token)}


class Checkpointing:
    """Saves the run every `save_every` steps and at the last (collective under torchrun).

    With `--async-save` a sharded save is written in the background and published when the
    next one starts or the run ends (`finish`)."""

    def __init__(self, run: TrainRun) -> None:
        self._run = run
        self._pending: PendingSave | None = None

    def after_step(self, report: StepReport) -> None:
        run = self._run
        if _is_due(report.step, run.options.save_every, run.options.steps):
            run.checkpoint = self.save(report.step)

    def finish(self) -> None:
        """Publish the save still being written, if any (collective)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._run.checkpoint = pending.finish()

    def save(self, step: int) -> Path:
        run = self._run
        document = run_state(run.built, run.options, run.sampler, run.train_losses,
                             run.validation_losses, run.data)
        tokenizer = run.tokenizer.file  # the tokenizer travels with every checkpoint
        extra = {TOKENIZER_FILE: tokenizer} if tokenizer is not None else {}
        if run.options.sharded_checkpoints:
            self.finish()
            pending = start_sharded_checkpoint(
                run.options.out_dir, step, run.trained, run.optimizer, document, pg=run.pg,
                rng_state=rng_state(), extra_files=extra, asynchronous=run.options.async_save)
            if not run.options.async_save:
                return pending.finish()
            self._pending = pending
            return run.checkpoint if run.checkpoint is not None else pending.step_directory
        if run.launch.is_distributed:
            return save_distributed_checkpoint(run.options.out_dir, step, run.model,
                                               run.optimizer, document, pg=run.pg,
                                               rng_state=rng_state(), extra_files=extra)
        return save_checkpoint(run.options.out_dir, step, run.model, run.optimizer,
                               {**document, "rng": rng_state()}, extra_files=extra)
