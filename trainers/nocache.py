"""`none` mode trainer: the no-cache baseline.

Every iteration fetches every row its slice reads from the servers (answered after
the previous stage is applied) and sends every gradient contribution back; the
servers apply the shared optimizer. The step itself is `local`'s, unchanged. The
trainer reads its slices one iteration ahead: the next slice's keys are what it
fetches at this iteration's stage, so the plan only has to confirm them.
"""

from __future__ import annotations

import torch

from bagpipe.digest import dense_digest_reporter
from bagpipe.protocol import RowBlock
from bagpipe.trainers.runtime import NO_KEYS, TrainerRuntime
from bagpipe.trainers.step import slice_step


def run_nocache_trainer(rt: TrainerRuntime) -> None:
    cfg, channel = rt.cfg, rt.channel
    clock = rt.start_clock()
    batches = rt.slices()

    def read_next():
        """The next slice; a fault kills here, on the read of the slice it names, as before."""
        item = rt.read_slice(batches)
        if item is not None:
            rt.crash_point(item[0].index)
        return item

    current = read_next()
    boot = rt.start - 1  # the bootstrap stage fetches the first iteration's rows
    rt.next_plan(boot)
    first_keys = current[1].keys if current is not None else NO_KEYS
    channel.send_stage(boot, first_keys)
    pending = channel.post_answers(boot, first_keys, with_state=False)
    bar = rt.progress(cfg.cluster.mode)
    i = rt.start
    while current is not None:
        part, sk = current
        rt.next_plan(i).check_reads(sk.keys, rt.desc)
        upcoming = read_next()
        fetch_keys = upcoming[1].keys if upcoming is not None else NO_KEYS
        with clock.phase("wait"):
            working_set, _ = channel.wait_answers(pending)
        fetched_bytes = pending.bytes
        with clock.phase("compute"):
            result = slice_step(rt.dense.model, torch.from_numpy(part.dense), torch.from_numpy(part.labels),
                                working_set, sk, cfg.data.batch_size)
        with clock.phase("exchange"):
            # gradients go to the servers first, so they apply them while the dense
            # gradients are reduced
            rt.start_dense_reduction(result)
            sent = channel.send_stage(i, fetch_keys, grads=RowBlock(sk.keys, result.row_grads))
            pending = channel.post_answers(i, fetch_keys, with_state=False)
            dense_grad, loss = rt.finish_dense_reduction()
        with clock.phase("update"):
            lr_dense = rt.dense_step(dense_grad, i)
        record = {"iter": i, "loss": loss.item(), "lr_dense": lr_dense, "rows_read": len(sk.keys),
                  "rows_fetched": len(sk.keys),
                  "bytes_server": fetched_bytes + sent}
        if dense_digest_reporter(i, rt.T) == rt.k:
            record["dense_digest"] = rt.dense.digest(with_optimizer_state=False)
        rt.report(record)
        rt.evaluate_during_training(i)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        current, i = upcoming, i + 1
    bar.close()
    channel.wait_answers(pending)  # the last stage answers nothing, but its frames must arrive
    rt.evaluate_final()
    rt.finish()
