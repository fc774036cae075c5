"""Training throughput: Loopline's train loop against a bare PyTorch loop on the same tensors.

Run: ``.venv/bin/python -m benchmarks.bench_training [--rows 1000000] [--epochs 3]
[--device auto|cpu|cuda] [--batch-size 2048] [--threads N] [--frame]
[--task binary_classification|regression] [--smoke]``

Self-contained: synthetic, device-resident tensors shaped like the fraud training set
(8 numeric features + 8 missing indicators, 4 categoricals) are generated here, labelled for
the task (models.tasks): ~2% positives for ``binary_classification`` (the default, the fraud
model's task), or minutes-like values (mean ~31, spread ~10, a function of the features plus
noise) for ``regression`` (the delivery model's task), standardised with the train rows' mean
and standard deviation as ``models.train`` does.

(a) Loopline: ``models.loop.fit`` — seeded random permutation per epoch, OOV masking, bf16
    autocast on CUDA, non-finite loss guard, per-epoch loss bookkeeping, best-weights copy;
    a regressor's loss is ``models.tasks.Regression().huber``, as ``models.train`` passes it.
(b) Bare: the minimal loop over contiguous slices: forward, BCE with pos_weight (a regressor:
    ``F.huber_loss`` with delta 1), zero_grad, backward, AdamW step (same autocast on CUDA,
    same model, same optimizer settings).
Both are timed best of --repeats, interleaved; the ratio b/a in samples/s is the figure of
merit (goal: Loopline within 1.2x of bare). Then one full run with a validation split (early
stopping on) gives the time to train on --rows rows for --epochs epochs. With --frame (needs
Polars), the end-to-end ``models.train.train_model`` from a Polars frame is timed as well.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from benchmarks import results
from models.loop import LossFn, TensorData, autocast_for, fit, make_optimizer, select_device
from models.network import TabularNet, build_network, count_parameters
from models.spec import TASK_TYPES, TrainConfig
from models.tasks import BINARY, REGRESSION, Regression

N_NUMERIC = 8
CARDINALITIES = (3 + 2, 40 + 2, 25 + 2, 40 + 2)


def make_tensors(rows: int, seed: int, device: torch.device, task: str = BINARY) -> TensorData:
    """Features with a learnable signal, labelled for ``task`` (a regressor's in minutes, not
    yet standardised); generated on the CPU, then moved once to the device."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, N_NUMERIC, generator=g)
    missing = (torch.rand(rows, N_NUMERIC, generator=g) < 0.05).float()
    values = values * (1 - missing)
    categorical = torch.stack(
        [torch.randint(0, c, (rows,), generator=g) for c in CARDINALITIES], dim=1
    )
    score = values[:, 0] * 1.5 + values[:, 1] * values[:, 2] + (categorical[:, 1] % 7 == 0) * 1.0
    noise = torch.randn(rows, generator=g)
    if task == REGRESSION:
        label = (30.0 + 5.0 * score + 3.0 * noise).clamp_min(1.0)
    else:
        label = (score + noise > 4.2).float()
    numeric = torch.cat([values, missing], dim=1).contiguous()
    return TensorData(numeric, categorical.contiguous(), label).to(device)


def label_stats(data: TensorData) -> tuple[float, float]:
    """A regression target's mean and (population) standard deviation, in float64 as
    ``models.train`` takes them from the train split."""
    y = data.label.double()
    return float(y.mean()), float(y.std(correction=0))


def standardised(data: TensorData, mean: float, std: float) -> TensorData:
    """The rows with their target as z-scores, what ``models.train`` hands ``fit``."""
    return replace(data, label=(data.label - mean) / std)


def loss_for(task: str) -> LossFn | None:
    """``fit``'s loss: None (the classifier's, built from the config) or the regressor's."""
    return Regression().huber if task == REGRESSION else None


def new_model(config: TrainConfig, seed: int) -> TabularNet:
    torch.manual_seed(seed)
    return build_network(
        2 * N_NUMERIC,
        CARDINALITIES,
        hidden=config.hidden,
        dropout=config.dropout,
        embedding_dim=config.embedding_dim,
        max_embedding_dim=config.max_embedding_dim,
        numeric_clip=config.numeric_clip,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(
    model: TabularNet,
    data: TensorData,
    config: TrainConfig,
    device: torch.device,
    pos_weight: float,
    task: str = BINARY,
) -> float:
    """The reference: what one writes with no bookkeeping at all. Returns seconds."""
    model.to(device).train()
    optimizer = make_optimizer(model, config)
    weight = torch.tensor(pos_weight, device=device)
    huber = task == REGRESSION
    n, bs = len(data), config.batch_size
    sync(device)
    t0 = time.perf_counter()
    for _ in range(config.epochs):
        for s in range(0, n, bs):
            with autocast_for(device):
                logits = model(data.numeric[s : s + bs], data.categorical[s : s + bs])
            if huber:
                loss = F.huber_loss(logits.float(), data.label[s : s + bs], delta=1.0)
            else:
                loss = F.binary_cross_entropy_with_logits(
                    logits.float(), data.label[s : s + bs], pos_weight=weight
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    sync(device)
    return time.perf_counter() - t0


def loopline_loop(
    model: TabularNet,
    data: TensorData,
    config: TrainConfig,
    device: torch.device,
    pos_weight: float,
    task: str = BINARY,
) -> float:
    sync(device)
    t0 = time.perf_counter()
    fit(model, data, None, config, device, pos_weight=pos_weight, loss_fn=loss_for(task))
    sync(device)
    return time.perf_counter() - t0


def frame_end_to_end(rows: int, config: TrainConfig, task: str = BINARY) -> tuple[float, int]:
    """train_model from a Polars frame: preprocessing, tensors, training, calibration (a
    regressor: target standardisation and its output affine)."""
    import datetime as dt

    import numpy as np
    import polars as pl

    from models.spec import FeatureSpec
    from models.train import train_model

    rng = np.random.default_rng(0)
    numeric = {f"f{i}": rng.normal(size=rows) for i in range(N_NUMERIC)}
    for i in range(N_NUMERIC):
        numeric[f"f{i}"][rng.random(rows) < 0.05] = np.nan
    cats = {f"c{j}": rng.integers(0, c - 2, rows).astype(str) for j, c in enumerate(CARDINALITIES)}
    score = np.nan_to_num(numeric["f0"]) * 1.5 + rng.normal(size=rows)
    if task == REGRESSION:
        label = np.clip(30.0 + 5.0 * score, 1.0, None)  # minutes
    else:
        label = (score > 3.5).astype(np.int8)
    split_at = (int(rows * 0.7), int(rows * 0.85))
    idx = np.arange(rows)
    frame = pl.DataFrame(
        {
            **numeric,
            **cats,
            "label": label,
            "split": np.where(
                idx < split_at[0], "train", np.where(idx < split_at[1], "validation", "test")
            ),
            "event_timestamp": pl.datetime_range(
                dt.datetime(2026, 10, 1, tzinfo=dt.UTC),
                dt.datetime(2026, 10, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=rows - 1),
                interval="1s",
                eager=True,
                time_zone="UTC",
            ),
        }
    ).with_columns(pl.col(f"f{i}").fill_nan(None) for i in range(N_NUMERIC))
    spec = FeatureSpec(numeric=tuple(numeric), categorical=tuple(cats), task=task)
    t0 = time.perf_counter()
    result = train_model(frame, spec, config)
    return time.perf_counter() - t0, len(result.history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--frame", action="store_true", help="also time train_model from Polars")
    parser.add_argument("--task", choices=TASK_TYPES, default=BINARY, help="labels and loss")
    args, recording = results.parse_args(
        parser, "bench_training", smoke={"rows": 20_000, "epochs": 1, "repeats": 1, "frame": True}
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, device=args.device)
    task, loss_fn = args.task, loss_for(args.task)
    data = make_tensors(args.rows, seed=0, device=device, task=task)
    if task == REGRESSION:
        pos_weight = 1.0
        mean, std = label_stats(data)
        data = standardised(data, mean, std)
        labels = f"task={task} label mean={mean:.2f} std={std:.2f} (trained standardised)"
    else:
        pos_weight = float((len(data) - data.label.sum()) / data.label.sum())
        labels = f"positives={data.label.mean().item():.3%}"
    template = new_model(config, seed=0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device={device} ({name}) torch={torch.__version__} threads={torch.get_num_threads()} "
        f"rows={args.rows} epochs={args.epochs} batch={args.batch_size} "
        f"params={count_parameters(template)} {labels}"
    )

    warm = replace(config, epochs=1)
    small = TensorData(data.numeric[:20_000], data.categorical[:20_000], data.label[:20_000])
    bare_loop(copy.deepcopy(template), small, warm, device, pos_weight, task)
    loopline_loop(copy.deepcopy(template), small, warm, device, pos_weight, task)

    samples = args.rows * args.epochs
    best = {"bare": float("inf"), "loopline": float("inf")}
    for r in range(args.repeats):
        for label, runner in (("bare", bare_loop), ("loopline", loopline_loop)):
            seconds = runner(copy.deepcopy(template), data, config, device, pos_weight, task)
            best[label] = min(best[label], seconds)
            print(
                f"  round {r + 1} {label:9s} {seconds:8.2f} s  {samples / seconds:12,.0f} samples/s"
            )
    bare_sps = samples / best["bare"]
    loop_sps = samples / best["loopline"]
    print(f"bare PyTorch loop : {bare_sps:12,.0f} samples/s (best {best['bare']:.2f} s)")
    print(f"Loopline fit      : {loop_sps:12,.0f} samples/s (best {best['loopline']:.2f} s)")
    print(f"ratio bare/Loopline: {bare_sps / loop_sps:.3f}x (goal <= 1.2x)")

    n_val = max(args.rows * 15 // 100, 1)
    val = make_tensors(n_val, seed=1, device=device, task=task)
    if task == REGRESSION:
        val = standardised(val, mean, std)  # the train rows' statistics, as models.train
    model = copy.deepcopy(template)
    sync(device)
    t0 = time.perf_counter()
    result = fit(model, data, val, config, device, pos_weight=pos_weight, loss_fn=loss_fn)
    sync(device)
    total = time.perf_counter() - t0
    print(
        f"full fit with validation ({n_val} rows) and early stopping: {total:.2f} s for "
        f"{len(result.history)} epochs on {args.rows} rows; val loss "
        + ", ".join(f"{h['val_loss']:.4f}" for h in result.history)
    )
    sub = TensorData(data.numeric[:200_000], data.categorical[:200_000], data.label[:200_000])
    once = replace(config, epochs=1)
    a, b = copy.deepcopy(template), copy.deepcopy(template)
    fit(a, sub, None, once, device, pos_weight=pos_weight, loss_fn=loss_fn)
    fit(b, sub, None, once, device, pos_weight=pos_weight, loss_fn=loss_fn)
    diffs = [
        (x - y).abs().max().item()
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    ]
    print(
        f"same seed twice (1 epoch, {len(sub)} rows): identical weights "
        f"{all(d == 0 for d in diffs)} (max |diff| {max(diffs):.3g})"
    )
    figures = [
        results.compared(
            "training throughput (loopline fit)",
            loop_sps,
            "samples/s",
            "bare PyTorch loop on the same tensors",
            bare_sps,
            ratio=bare_sps / loop_sps,
            ratio_of="bare / loopline",
            goal=results.Goal(op="<=", target=1.2),
        ),
        results.Figure(name="full fit with validation", value=total, unit="s"),
        results.Figure(
            name="same seed twice: largest weight difference",
            value=max(diffs),
            unit="abs",
            goal=results.Goal(op="<=", target=0, on="value"),
        ),
    ]
    if args.frame:
        seconds, epochs = frame_end_to_end(args.rows, config, task)
        print(f"train_model end to end from a Polars frame: {seconds:.2f} s ({epochs} epochs)")
        figures.append(
            results.Figure(
                name="train_model end to end from a Polars frame", value=seconds, unit="s"
            )
        )
    variant = [task] if task == REGRESSION else []
    variant += [device.type] if device.type != "cpu" else []
    recording.write(figures, variant="-".join(variant) or None)


if __name__ == "__main__":
    main()
