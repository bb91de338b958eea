"""`none` mode trainer: the no-cache baseline.

Every iteration fetches every row its slice reads from the servers (answered after
the previous stage is applied) and sends every gradient contribution back; the
servers apply the shared optimizer. The step itself is `local`'s, unchanged.
"""

from __future__ import annotations

import time

import torch

from bagpipe.trainers.common import PhaseTimer
from bagpipe.trainers.runtime import NO_KEYS, TrainerRuntime
from bagpipe.trainers.step import slice_step


def run_nocache_trainer(rt: TrainerRuntime) -> None:
    cfg, opt = rt.cfg, rt.cfg.optimizer
    timer = PhaseTimer()
    _, pending = rt.bootstrap(with_state=False)
    bar = rt.progress("none")
    for plan, part, sk in rt.iterations():
        start = time.perf_counter()
        i = plan.iteration
        with timer.phase("wait"):
            working_set, _ = rt.wait_answers(pending)
        fetched_bytes = pending.bytes
        with timer.phase("compute"):
            result = slice_step(rt.dense.model, torch.from_numpy(part.dense), torch.from_numpy(part.labels),
                                working_set, sk.inverse, cfg.data.batch_size)
        with timer.phase("exchange"):
            # gradients go to the servers first, so they apply them while the dense
            # gradients are reduced
            dense = rt.start_dense_reduction(result)
            sent = rt.send_stage(i, sk.keys, result.row_grads, NO_KEYS, None, None, plan.fetch_keys)
            pending = rt.post_answers(i, plan.fetch_keys, with_state=False)
            dense_grad, loss = rt.finish_dense_reduction(dense)
        with timer.phase("update"):
            rt.dense.step(dense_grad, opt.dense_lr_at(i))
        record = {
            "iter": i, "loss": loss.item(), "rows_read": len(sk.keys), "rows_fetched": len(sk.keys),
            "bytes_server": fetched_bytes + sent,
        }
        if rt.k == 0:
            record["dense_digest"] = rt.dense.digest(with_optimizer_state=False)
        record.update({k: v for k, v in timer.pop().items()})
        record["time_iter"] = time.perf_counter() - start
        rt.send_metrics(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    rt.wait_answers(pending)  # the last stage answers nothing, but its frames must arrive
    rt.evaluate_over_servers(first_stage=rt.data.num_train_batches)
    rt.finish()
