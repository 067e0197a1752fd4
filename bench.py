"""Performance benchmarks; never part of the test pass/fail.

    python bench.py samplers     # distribution error against NFE for every sampler (2D Gaussian mixture)
    python bench.py arc          # ARC training examples/s and peak memory per preset
    python bench.py arc_cpu      # the CPU-scale ARC benchmark: train two seeds (about 30 min each), score the ladder
    python bench.py models       # image backbones: train / sample samples/s and peak memory
    python bench.py scaling      # HDiT, LocalMamba and DiT step time and memory against the number of tokens
    python bench.py mri          # brain-MRI UNet 2D / 3D beside MONAI; 3D checkpointing and s2d / wavelet memory
    python bench.py vae          # KL / VQ / DC autoencoders 2D / 3D beside diffusers' and MONAI's AutoencoderKL

Each prints a table and writes bench_<name>.json (key out_dir=... to choose the folder);
`python bench.py NAME --help` lists that benchmark's options.
"""

import contextlib
import inspect
import json
import math
import os
import sys
import time

import torch

import common
import models

# ----------------------------------------------------------------------------------------------------------------
# Shared measurement: every timed benchmark runs each case in a fresh process, so peak memory is its own
# ----------------------------------------------------------------------------------------------------------------


def device_name():
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"


def in_fresh_process(fn, args):
    """fn(args) in a new spawned process; returns its result."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.map(fn, [args])[0]


def memory_baseline(dev):
    """Start measuring peak memory: CUDA's peak is reset; on CPU the peak RSS so far is returned, to subtract."""
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return 0.0
    return common.peak_memory_mb(dev)


def seconds_per_call(f, iters, dev):
    """Mean wall time of f() over `iters` calls after one warm-up call."""
    f()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        f()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def result_path(out_dir, name):
    """OUT_DIR/bench_<name>.json, its folder created and checked before any work (a benchmark can run for an hour)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        common.unwritable(out_dir, e)
    common.check(os.access(out_dir, os.W_OK), f"out_dir={out_dir!r} is not writable; choose a writable out_dir=")
    return os.path.join(out_dir, f"bench_{name}.json")


def write_result(path, result):
    try:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    except OSError as e:
        common.unwritable(path, e)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------------------------
# samplers
# ----------------------------------------------------------------------------------------------------------------

SAMPLER_MIXTURE = {"weights": [0.5, 0.3, 0.2], "means": [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], "stds": [0.3, 0.5, 0.2]}
SAMPLER_BENCH = {  # key=value overrides of `python bench.py samplers`
    "N": 50_000,  # samples per sampler, schedule, grid, NFE and repeat
    "REPEATS": 4,  # independent (noise, reference draw) pairs each error is averaged over
    "FLOOR_DRAWS": 16,  # independent draws per reference draw the floor is averaged over (4 pairs: +-15% noise)
    "NFES": (5, 10, 20, 50),  # network evaluations (heun may use one fewer: 2 per step + the final denoise)
    "S_MAX": 10.0,  # karras / logsnr grids: the first step jumps from t = 1 to sigma / alpha = S_MAX
    "S_MIN": 0.03,  # karras / logsnr grids end at sigma / alpha = S_MIN, then the final denoise (1 NFE)
    "RHO": 7.0,  # karras grid exponent (Karras et al. 2022 eq. 5)
    "FIT_NFES": (5, 10),  # NFEs of the fitted grids (common.fit_grid; at 20 and 50 the fixed grids reach the floor)
    "X0_VAR_N": 10_000,  # ddpm: mixture draws its Analytic-DPM variance is estimated on (0: DDPM's posterior variance)
    "FIT_PILOT": 8000,  # pilot batch each fitted grid is fitted on (its own seed, apart from the evaluation's noise)
    "SCHEDULES": ("cosine", "linear", "flow"),  # noise schedules of the mixture tables
    "MIXTURE": True,  # the mixture tables (false: only the image check)
    "IMAGE_RUN": "",  # a train_stl10.py run: also FD-EffNet of its samples at IMAGE_NFES for IMAGE_SAMPLERS
    "IMAGE_SAMPLERS": ("unipc", "dpmpp_2m", "heun", "ddpm"),  # samplers of the image check
    "IMAGE_NFES": (10, 20, 50),  # NFE of the image check (each sample: 2 network passes per NFE with guidance)
    "IMAGE_GRID": "logsnr",  # time grid of the image check (uniform for ddpm, whose steps the run was made for)
    "IMAGE_ANALYTIC_VAR": 0,  # ddpm rows: training images for its Analytic-DPM variance (train_stl10 analytic_var)
    "IMAGE_N": 500,  # samples per image-check row (sample i from seed i, class i % K), scored against N held-out
    "OUT_DIR": ".",  # where bench_samplers.json goes
}


def grid_options(grid, schedule, s_max, s_min, rho):
    """common.sample keywords of a bench grid: uniform ends at t = 0 (its last step jumps to x0_hat, as before the
    grids existed); karras and logsnr run from t = 1 to sigma / alpha = s_min, then the final denoise."""
    if grid == "uniform":
        return {"grid": "uniform", "t_min": 0.0}
    t_min = float(schedule.t_from_log_snr(torch.tensor(-2 * math.log(s_min), dtype=torch.float64)))
    return {"grid": grid, "t_min": t_min, "s_max": s_max, "rho": rho}


def sampler_options(mixture, schedule, sampler, denoise, x0_var_n):
    """ddpm's x0_var: common.x0_variance on x0_var_n draws of the mixture of their own seed (none at 0)."""
    if sampler != "ddpm" or x0_var_n == 0:
        return {}
    return {
        "x0_var": common.x0_variance(denoise, mixture.sample(x0_var_n, torch.Generator().manual_seed(4000)), schedule)
    }


def mixture_errors(mixture, schedule, sampler, options, nfes, noises, refs, x0_var_n=0):
    """The mean over repeats of GaussianMixture.error(samples, reference draw) at each NFE, and the NFE used."""
    denoise = common.make_denoiser(mixture.model(schedule, "v"), schedule, "v")
    extra = sampler_options(mixture, schedule, sampler, denoise, x0_var_n)
    errors, used = {}, {}
    for nfe in nfes:
        steps = common.steps_for_nfe(sampler, nfe, options["t_min"])
        ts = common.sample_grid(steps, schedule, **options)
        used[nfe] = common.count_nfe(sampler, ts)
        total = 0.0
        for r, (noise, ref) in enumerate(zip(noises, refs)):
            x = common.sample(
                sampler, denoise, noise, steps, schedule, generator=torch.Generator().manual_seed(r), **options, **extra
            )
            total += mixture.error(x, ref)["max"]
        errors[nfe] = total / len(noises)
    return errors, used


def accurate_error(mixture, schedule, noises, refs):
    """The error of an accurate solve of the evaluation noise (UniPC, 400 steps on the logsnr grid from s = 100 to
    1e-3): what 'at the floor' looks like on these draws."""
    denoise = common.make_denoiser(mixture.model(schedule, "v"), schedule, "v")
    total = 0.0
    for noise, ref in zip(noises, refs):
        total += mixture.error(common.accurate_solve(denoise, noise, schedule), ref)["max"]
    return total / len(noises)


FITTED = ("ddpm", "ddim", "heun", "dpmpp_2m", "dpmpp_3m", "unipc")  # samplers with a fitted grid (euler is ddim)


def fitted_row(mixture, schedule, name, cfg, pilot, noises, refs):
    """The `fitted` grid of sampler `name` at each FIT_NFES: common.fit_grid on the pilot batch, minimising the sum of
    squares of the per-component errors the bench's metric takes the max of (GaussianMixture.squared_error) between
    the sampler's output and a 400-step UniPC solve of the same pilot noise, then scored like every other row on the
    evaluation noise against the independent draws. Measured at 10 NFE (UniPC): the mean squared distance, fit_grid's
    default, fits grids 1.85-2.8x the floor (it weighs the narrow component's errors by its scale, not its std); the
    metric's max itself 1.5-2.0x (a non-smooth objective: Nelder-Mead stops in local optima); the sum of squares on
    2,000 pilot samples 1.57-1.69x and on 8,000 1.48-1.52x (a small pilot overfits: 0.007 on the pilot, 0.021 on
    fresh noise); these ratios are to the floor of 4 draws then used (0.0178; 16 per reference draw: 0.0198). ddpm's
    fit runs on fixed random numbers (fit_grid's seed); its output is scored as a distribution all the same."""
    denoise = common.make_denoiser(mixture.model(schedule, "v"), schedule, "v")
    distance, options = mixture.squared_error, sampler_options(mixture, schedule, name, denoise, cfg["x0_var_n"])
    errors, used, grids, calls = {}, {}, {}, 0
    for nfe in cfg["fit_nfes"]:
        steps = common.steps_for_nfe(name, nfe, t_min=cfg["s_min"])
        ts, info = common.fit_grid(  # ddpm: the same random numbers (seed 0) at every evaluation of the fit
            name,
            denoise,
            pilot,
            steps,
            schedule,
            distance,
            s_max=cfg["s_max"],
            s_min=cfg["s_min"],
            seed=0,
            options=options,
        )
        used[nfe], grids[nfe], calls = common.count_nfe(name, ts), ts.tolist(), calls + info["calls"]
        total = 0.0
        for r, (noise, ref) in enumerate(zip(noises, refs)):
            gen = torch.Generator().manual_seed(r)
            x = common.sample(name, denoise, noise, steps, schedule, times=ts, generator=gen, **options)
            total += mixture.error(x, ref)["max"]
        errors[nfe] = total / len(noises)
        print(f"fitted {schedule.kind} {name} NFE {nfe}: error {errors[nfe]:.4f}", flush=True)
    row = {"schedule": schedule.kind, "grid": "fitted", "sampler": name, "error": errors, "nfe_used": used}
    return {**row, "times": grids, "fit_calls": calls}


def bench_samplers(argv):
    """Distribution error against NFE for every sampler x time grid x schedule, driven by a synthetic 2D Gaussian
    mixture's closed-form optimal denoiser (v-prediction): GaussianMixture.error (max of the per-component weight,
    mean / s_k and std / s_k errors) between the samples and an independent draw of the mixture, averaged over
    REPEATS (noise, draw) pairs. The floor is the same metric between two independent draws. The `fitted` rows: a grid
    fitted per schedule, sampler and NFE in FIT_NFES (see fitted_row). With image_run=, also the image check:
    FD-EffNet of a train_stl10.py run's samples at IMAGE_NFES for IMAGE_SAMPLERS."""
    cfg = common.apply_overrides(dict(SAMPLER_BENCH, __doc__=bench_samplers.__doc__), argv)
    n, repeats, nfes = cfg["n"], cfg["repeats"], cfg["nfes"]
    common.check(n >= 2, f"n={n}: give at least 2 samples")
    common.check(repeats >= 1, f"repeats={repeats}: give at least 1")
    common.check(cfg["floor_draws"] >= 1, f"floor_draws={cfg['floor_draws']}: give at least 1")
    common.check(len(nfes) > 0 and all(isinstance(k, int) and k >= 2 for k in nfes), f"nfes={nfes}: give NFEs >= 2")
    common.check(0 < cfg["s_min"] < cfg["s_max"], f"s_min={cfg['s_min']}, s_max={cfg['s_max']}: need 0 < s_min < s_max")
    common.check(cfg["rho"] > 0, f"rho={cfg['rho']}: give a positive exponent")
    for kind in cfg["schedules"]:
        common.check(
            kind in common.Schedule.KINDS, f"schedules: {kind!r} is not one of {', '.join(common.Schedule.KINDS)}"
        )
    common.check(cfg["x0_var_n"] >= 0, f"x0_var_n={cfg['x0_var_n']}: give 0 (no Analytic-DPM variance) or more draws")
    common.check(cfg["fit_pilot"] >= 2, f"fit_pilot={cfg['fit_pilot']}: give at least 2 samples")
    common.check(
        all(isinstance(k, int) and k >= 2 for k in cfg["fit_nfes"]), f"fit_nfes={cfg['fit_nfes']}: give NFEs >= 2"
    )
    common.check(cfg["image_analytic_var"] >= 0, f"image_analytic_var={cfg['image_analytic_var']}: give 0 or more")
    common.check(cfg["image_n"] >= 2, f"image_n={cfg['image_n']}: give at least 2 samples")
    common.check(
        all(isinstance(k, int) and k >= 2 for k in cfg["image_nfes"]), f"image_nfes={cfg['image_nfes']}: NFEs >= 2"
    )
    common.check(
        cfg["image_grid"] in common.GRIDS, f"image_grid={cfg['image_grid']!r}: one of {', '.join(common.GRIDS)}"
    )
    for name in cfg["image_samplers"]:
        common.check(name in common.SAMPLERS, f"image_samplers: {name!r} is not one of {', '.join(common.SAMPLERS)}")
    if cfg["image_run"]:  # a missing or wrong run stops now, not after the mixture tables
        script = common.load_config(common.resolve_checkpoint(cfg["image_run"])).get("script")
        common.check(script == "train_stl10", f"image_run={cfg['image_run']!r} is a {script} run, not train_stl10.py")
    path = result_path(cfg["out_dir"], "samplers")
    if not cfg["mixture"]:
        write_result(path, {"images": image_check(cfg)})
        return
    torch.set_num_threads(1)  # many tiny tensor operations: intra-op threads only add overhead
    mixture = common.GaussianMixture(**SAMPLER_MIXTURE)
    draw = lambda seed: mixture.sample(n, torch.Generator().manual_seed(seed))  # noqa: E731
    refs = [draw(1000 + r) for r in range(repeats)]
    per_ref = cfg["floor_draws"]  # the floor: an exact sampler's error, estimated from many draws (only draws: cheap)
    floor = sum(
        mixture.error(draw(2000 + per_ref * r + j), refs[r])["max"] for r in range(repeats) for j in range(per_ref)
    )
    floor /= repeats * per_ref
    noises = [
        torch.randn(n, 2, generator=torch.Generator().manual_seed(3000 + r), dtype=torch.float64)
        for r in range(repeats)
    ]
    pilot = torch.randn(cfg["fit_pilot"], 2, generator=torch.Generator().manual_seed(77), dtype=torch.float64)
    rows, accurate = [], {}
    for kind in cfg["schedules"]:
        schedule = common.Schedule(kind)
        accurate[kind] = accurate_error(mixture, schedule, noises, refs)
        for grid in common.GRIDS:
            options = grid_options(grid, schedule, cfg["s_max"], cfg["s_min"], cfg["rho"])
            for name in common.SAMPLERS:
                errors, used = mixture_errors(mixture, schedule, name, options, nfes, noises, refs, cfg["x0_var_n"])
                rows.append({"schedule": kind, "grid": grid, "sampler": name, "error": errors, "nfe_used": used})
        for name in FITTED:
            rows.append(fitted_row(mixture, schedule, name, cfg, pilot, noises, refs))
    print(
        f"distribution error vs NFE on the synthetic 2D Gaussian mixture: {n} samples, mean of {repeats} (noise, "
        f"reference draw) pairs; the floor (the mean over {repeats} x {per_ref} pairs of independent draws of the mixture) "
        f"is {floor:.4f}; an accurate solve (UniPC, 400 steps) scores "
        + ", ".join(f"{e:.4f} ({e / floor:.2f}x) on {kind}" for kind, e in accurate.items())
        + f". uniform: t from 1 "
        f"to 0; karras (rho {cfg['rho']:g}) and logsnr: t = 1, then sigma / alpha from {cfg['s_max']:g} to "
        f"{cfg['s_min']:g}, then the final denoise"
    )
    print(
        f"{'schedule':<8} {'grid':<8} {'sampler':<9} "
        + " ".join(f"{'NFE ' + str(k):>8}" for k in nfes)
        + "   x floor at NFE "
        + str(nfes[min(1, len(nfes) - 1)])
    )
    for r in rows:
        k = nfes[min(1, len(nfes) - 1)]
        print(
            f"{r['schedule']:<8} {r['grid']:<8} {r['sampler']:<9} "
            + " ".join(f"{r['error'][nfe]:>8.4f}" if nfe in r["error"] else f"{'-':>8}" for nfe in nfes)
            + (f"   {r['error'][k] / floor:>6.2f}" if k in r["error"] else "")
        )
    summary = sampler_summary(rows, nfes, floor)
    for line in summary["lines"]:
        print(line)
    images = image_check(cfg) if cfg["image_run"] else None
    result = {
        "n": n,
        "repeats": repeats,
        "floor": floor,
        "floor_draws": per_ref,
        "accurate": accurate,
        "mixture": SAMPLER_MIXTURE,
        "rows": rows,
        "best": summary["best"],
        "worse_than_ddim": summary["worse_than_ddim"],
        "best_grid_worse_than_ddim": summary["best_grid_worse_than_ddim"],
        "images": images,
    }
    write_result(path, {**{k: cfg[k] for k in ("s_max", "s_min", "rho")}, **result})


def sampler_summary(rows, nfes, floor):
    """Per schedule and NFE the best (sampler, grid) and its ratio to the floor; every row worse than DDIM on the
    same schedule and grid at the same NFE; and every sampler whose best grid is worse than DDIM's best of the same
    grids (euler has no fitted grid: it is ddim)."""
    best, worse, worse_best, lines = {}, [], [], []
    for kind in dict.fromkeys(r["schedule"] for r in rows):
        for nfe in nfes:
            mine = [r for r in rows if r["schedule"] == kind and nfe in r["error"]]
            top = min(mine, key=lambda r: r["error"][nfe])
            best[f"{kind}/{nfe}"] = {
                "sampler": top["sampler"],
                "grid": top["grid"],
                "error": top["error"][nfe],
                "x_floor": top["error"][nfe] / floor,
            }
            for name in dict.fromkeys(r["sampler"] for r in mine if r["sampler"] != "ddim"):  # best grid vs DDIM's
                own = {r["grid"]: r["error"][nfe] for r in mine if r["sampler"] == name}  # best of the same grids
                ddim = [r["error"][nfe] for r in mine if r["sampler"] == "ddim" and r["grid"] in own]
                if ddim and min(own.values()) > min(ddim):
                    worse_best.append(f"{kind}/{name}@{nfe}")
        lines.append(
            f"best on {kind}: "
            + ", ".join(
                f"NFE {nfe} {best[f'{kind}/{nfe}']['sampler']}/{best[f'{kind}/{nfe}']['grid']} "
                f"{best[f'{kind}/{nfe}']['x_floor']:.2f}x floor"
                for nfe in nfes
            )
        )
    for r in rows:
        ddim = next(
            d for d in rows if d["schedule"] == r["schedule"] and d["grid"] == r["grid"] and d["sampler"] == "ddim"
        )
        for nfe in nfes:
            if nfe in r["error"] and r["error"][nfe] > ddim["error"][nfe]:
                worse.append(f"{r['schedule']}/{r['grid']}/{r['sampler']}@{nfe}")
    lines.append("worse than DDIM on the same schedule, grid and NFE: " + (", ".join(worse) or "none"))
    lines.append(
        "best grid worse than DDIM's best of the same grids (same schedule and NFE): "
        + (", ".join(worse_best) or "none")
    )
    return {"best": best, "worse_than_ddim": worse, "best_grid_worse_than_ddim": worse_best, "lines": lines}


def image_check(cfg):
    """FD-EffNet of IMAGE_N samples of a train_stl10.py run (EMA weights, its guidance) against IMAGE_N held-out
    images, for each of IMAGE_SAMPLERS at IMAGE_NFES; ddpm on the uniform grid, the others on IMAGE_GRID from t = 1 to
    the run's smallest training time 1 / t_steps, then the final denoise; ddpm with the Analytic-DPM variance estimated
    on IMAGE_ANALYTIC_VAR training images where that is above 0."""
    import evaluate
    import train_stl10

    ckpt = common.resolve_checkpoint(cfg["image_run"])
    config = common.load_config(ckpt)
    model = evaluate.rebuild(ckpt, config, "ema")
    rows = []
    for name in cfg["image_samplers"]:
        for nfe in cfg["image_nfes"]:
            grid = "uniform" if name == "ddpm" else cfg["image_grid"]
            t_min = 0.0 if grid == "uniform" else 1.0 / config["t_steps"]
            opts = {**train_stl10.EVAL, "checkpoint": ckpt}
            opts = {k.lower(): v for k, v in opts.items()}
            opts.update(
                n_samples=cfg["image_n"],
                n_real=cfg["image_n"],
                floor=False,
                sampler=name,
                grid=grid,
                t_min=t_min,
                sample_steps=common.steps_for_nfe(name, nfe, t_min),
                analytic_var=cfg["image_analytic_var"] if name == "ddpm" else 0,
            )
            label = f"{name}_analytic{opts['analytic_var']}" if opts["analytic_var"] else name
            folder = os.path.join(cfg["out_dir"], "bench_samplers_images", f"{label}_{grid}_nfe{nfe}")
            os.makedirs(folder, exist_ok=True)
            result, _ = train_stl10.evaluate(model, config, opts, folder)
            rows.append(
                {
                    "sampler": name,
                    "analytic_var": opts["analytic_var"],
                    "grid": grid,
                    "nfe": result["nfe"],
                    "FD-EffNet": result["FD-EffNet"],
                    "KID-EffNet": result["KID-EffNet"],
                    "sampling_s": result["sampling_s"],
                    "samples_png": os.path.join(folder, "eval_samples.png"),
                }
            )
            print(
                f"image check: {label:<9} {grid:<8} NFE {result['nfe']:>3}  FD-EffNet {result['FD-EffNet']:.1f}  "
                f"KID-EffNet {result['KID-EffNet']:.3f}  ({result['sampling_s']:.0f} s; {folder}/eval_samples.png)",
                flush=True,
            )
    return rows


# ----------------------------------------------------------------------------------------------------------------
# arc
# ----------------------------------------------------------------------------------------------------------------

ARC_BENCH = {  # key=value overrides of `python bench.py arc`
    "BATCH": -1,  # ARC pairs per training step; -1: 128 on GPU (the recipe's batch), 8 on CPU
    "SAMPLE_BATCH": -1,  # samples per denoising call; -1: 256 on GPU (evaluate.py's batch), 8 on CPU
    "GRID": 30,  # padded grid side, as in train_arc.py
    "ITERS": 3,  # timed steps per preset (after one warm-up)
    "SIZES": ("tiny", "micro", "toiny", "smol", "mediom", "lorge"),  # presets to run
    "OUT_DIR": ".",  # where bench_arc.json goes
}


def _arc_one(args):
    """One ARC preset in a fresh process: training examples/s (noising, self-conditioning, forward, backward,
    AdamW) on real ARC-AGI-1 training pairs, and peak memory."""
    import train_arc

    size, batch, sample_batch, grid, iters = args
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = memory_baseline(dev)
    task_ids, pairs, _ = train_arc.split_examples(train_arc.load_tasks("arc1"), "eval", grid, -1)
    data = {k: v.to(dev) for k, v in train_arc.to_tensors(pairs, grid).items()}
    net = models.make_model("arc", size, n_tasks=len(task_ids), grid=grid).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.01)
    gen = torch.Generator(device=dev).manual_seed(0)
    autocast = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    recipe = (train_arc.T_STEPS, train_arc.KEEP_FLOOR, train_arc.SELF_COND_PROB, train_arc.SIZE_WEIGHT)  # defaults

    def train_step(model):
        idx = torch.randint(0, len(pairs), (batch,), generator=gen, device=dev)
        with autocast:
            loss = train_arc.training_loss(model, data, idx, gen, *recipe)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_s = seconds_per_call(lambda: train_step(net), iters, dev)
    mem = common.peak_memory_mb(dev) - base
    masked_step_s = seconds_per_call(lambda: train_step(models.MaskedArc(net)), iters, dev)
    # sampling: one denoising step of sample_batch real pairs, cached prefix + split attention against the masked
    # full sequence (before); a sample is one size prediction (a prefix pass), then EVAL steps denoising steps
    net.eval()
    idx = torch.arange(sample_batch, device=dev) % len(pairs)
    zero = torch.zeros_like(idx)
    cond = train_arc.make_cond(data, idx, zero, zero)
    x, t = data["out"][idx].long(), torch.zeros(sample_batch, device=dev)
    with torch.no_grad(), autocast:
        cache = net.encode_prefix(cond)
        prefix_s = seconds_per_call(lambda: net.encode_prefix(cond), iters, dev)
        cached_s = seconds_per_call(lambda: net(x, t, cond, cache=cache), iters, dev)
        masked_s = seconds_per_call(lambda: net.forward_masked(x, t, cond), iters, dev)
    steps = train_arc.EVAL["STEPS"]
    before, after = prefix_s + steps * masked_s, 2 * prefix_s + steps * cached_s  # seconds per sample_batch samples
    params = sum(p.numel() for p in net.parameters()) / 1e6
    return {
        "size": size,
        "params_m": params,
        "train_examples_s": batch / step_s,
        "train_examples_s_masked": batch / masked_step_s,
        "peak_mem_mib": mem,
        "denoise_step_s_cached": cached_s,
        "denoise_step_s_masked": masked_s,
        "prefix_s": prefix_s,
        "samples_s": sample_batch / after,
        "samples_s_masked": sample_batch / before,
        # the full ARC-AGI-1 evaluation: 419 test pairs x (2 plain + 72 voting) samples of EVAL steps steps
        "full_eval_h": 419 * 74 / sample_batch * after / 3600,
        "full_eval_h_masked": 419 * 74 / sample_batch * before / 3600,
    }


def bench_arc(argv):
    """ARC denoiser presets at the train_arc.py configuration (GRID x GRID pairs, 4 + 2 GRID^2 tokens): training
    examples/s and peak memory (CUDA allocated, or on CPU the growth of the process's peak RSS), each preset in a
    fresh process; self-conditioning runs on about half the steps, as in training. Beside each, the same with the
    masked full-sequence attention (models.MaskedArc, the computation before the split), and sampling: samples/s
    and the estimated hours of the full ARC-AGI-1 evaluation (419 test pairs x 74 samples of evaluate.py's STEPS
    steps, plus their size predictions) with the prefix cached against the masked model recomputing it per step."""
    opts = common.apply_overrides(dict(ARC_BENCH, __doc__=bench_arc.__doc__), argv)
    common.check(opts["batch"] > 0 or opts["batch"] == -1, f"batch={opts['batch']}: give a positive number or -1")
    common.check(opts["iters"] > 0, f"iters={opts['iters']}: give a positive number")
    unknown = [s for s in opts["sizes"] if s not in models.ArcDenoiser.PRESETS]
    if unknown:
        common.die(f"sizes={unknown}: choose from {', '.join(models.ArcDenoiser.PRESETS)}")
    common.check(
        opts["sample_batch"] > 0 or opts["sample_batch"] == -1,
        f"sample_batch={opts['sample_batch']}: give a positive number or -1",
    )
    gpu = torch.cuda.is_available()
    batch = opts["batch"] if opts["batch"] > 0 else (128 if gpu else 8)
    sample_batch = opts["sample_batch"] if opts["sample_batch"] > 0 else (256 if gpu else 8)
    path = result_path(opts["out_dir"], "arc")
    device = device_name()
    print(f"arc: {opts['grid']}x{opts['grid']} grids, batch {batch}, sampling batch {sample_batch}, {device}")
    print("split = prefix on its own, then the output against its keys and values; masked = one masked attention")
    print("over the whole sequence (before). Sampling: split with the prefix cached once per sample.")
    print(
        f"{'preset':<8}{'params':>8} {'train ex/s split':>17} {'masked':>8} {'MiB':>7} {'samples/s cached':>17} "
        f"{'masked':>8} {'full eval h':>12} {'masked':>8}",
        flush=True,
    )
    rows = []
    for size in opts["sizes"]:
        rows.append(in_fresh_process(_arc_one, (size, batch, sample_batch, opts["grid"], opts["iters"])))
        r = rows[-1]
        print(
            f"{size:<8}{r['params_m']:>7.1f}M {r['train_examples_s']:>17.2f} {r['train_examples_s_masked']:>8.2f} "
            f"{r['peak_mem_mib']:>7.0f} {r['samples_s']:>17.2f} {r['samples_s_masked']:>8.2f} "
            f"{r['full_eval_h']:>12.2f} {r['full_eval_h_masked']:>8.2f}",
            flush=True,
        )
    write_result(path, {"batch": batch, "sample_batch": sample_batch, "device": device, **opts, "rows": rows})


ARC_CPU = {  # key=value overrides of `python bench.py arc_cpu`
    "SEEDS": (0, 1),  # one training run per seed, each on one core (OMP_NUM_THREADS=1)
    "STEPS": 4000,  # the fixed budget: optimizer updates of the benchmark recipe (about 35 min on one core)
    "TTT": 0.25,  # fraction of STEPS, the last, that fine-tune on the held-out tasks' demonstrations (ttt_steps); 0 off
    "TRAIN": "",  # extra train_arc.py overrides for an ablation, e.g. "self_cond_prob=0.8 lr=2e-3"
    "EVAL": "",  # extra evaluate.py overrides, e.g. "steps=64"
    "FIT_PAIRS": 32,  # training tasks' test pairs scored as the "fit" rung (seen in training; evenly spread)
    "PARALLEL": 2,  # processes at once (the cores)
    "OUT_DIR": "runs/arc_cpu_bench",  # one run folder per seed, and bench_arc_cpu.json
}
# The CPU benchmark's recipe: the real one (every pair of the training tasks and the evaluation tasks' demonstrations,
# the 72 augmentations, evaluate's default reverse kernel, 32 sampling steps) on the ARC-AGI-1 tasks whose every grid fits
# 10x10 (178 training + 77 evaluation tasks, 1067 training pairs, 88 held-out test pairs), at the micro preset; the
# last TTT of the updates fine-tune on the held-out tasks' demonstrations (test-time fine-tuning: +1 point of held-out
# cells on both seeds, the one held-out pair solved by voting; train="ttt_steps=0" runs the recipe without it).
ARC_CPU_RECIPE = tuple(
    "size=micro grid=10 holdout=eval batch_size=32 lr=1e-3 warmup_steps=200 dropout=0.0 ema_start=0.9 "
    "ema_decay=0.999 mixed_precision=no log_every=100 eval_every=1000 eval_pairs=16 ckpt_every=1000 resume=auto".split()
)
ARC_CPU_COUNTS = {"size_acc_plain": "size_right_plain", "pass2_plain": "solved_plain", "pass2_vote": "solved_vote"}
ARC_CPU_LADDER = (  # (result key, label), each reported per seed, as a mean and as pairs solved or counted
    ("size_acc_plain", "size right (plain attempt 1)"),
    ("cell_acc_plain", "cells right where the size is right"),
    ("cell_acc_black_plain", "  baseline: all black"),
    ("cell_acc_copy_plain", "  baseline: copy the input"),
    ("pass2_plain", "pass@2 plain"),
    ("pass2_vote", "pass@2 vote"),
)


def _run_all(commands, parallel, what):
    """Run the commands (argument lists, one log file each) `parallel` at a time; stop on the first failure."""
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pending, running = list(commands), []
    while pending or running:
        while pending and len(running) < parallel:
            args, log = pending.pop(0)
            running.append((subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env), log))
        time.sleep(2)
        for proc, log in list(running):
            if proc.poll() is not None:
                running.remove((proc, log))
                common.check(proc.returncode == 0, f"{what} failed (exit {proc.returncode}); see {log}")


def bench_arc_cpu(argv):
    """The CPU-scale ARC benchmark: train_arc.py with the benchmark recipe (ARC_CPU_RECIPE: ARC-AGI-1 tasks that fit
    10x10, the micro preset, STEPS updates) once per seed, PARALLEL processes at a time, then evaluate.py on each
    (plain and 72-augmentation voting, on the 88 held-out evaluation test pairs and on FIT_PAIRS training tasks' test
    pairs seen in training), and the ladder: size accuracy, cell accuracy of sampled grids whose size is right
    beside the all-black and copy-the-input baselines, pass@2 plain and with voting, each per seed with the pairs
    solved, and the mean. A finished run folder is evaluated again, not retrained (resume=auto)."""
    cfg = common.apply_overrides(dict(ARC_CPU, __doc__=bench_arc_cpu.__doc__), argv)
    seeds = cfg["seeds"]
    common.check(
        len(seeds) > 0 and all(isinstance(s, int) and s >= 0 for s in seeds), f"seeds={seeds}: give seeds >= 0"
    )
    common.check(cfg["steps"] > 0, f"steps={cfg['steps']}: give a positive number of updates")
    common.check(0 <= cfg["ttt"] <= 1, f"ttt={cfg['ttt']}: give a fraction of the steps in [0, 1]")
    common.check(cfg["parallel"] > 0, f"parallel={cfg['parallel']}: give a positive number of processes")
    common.check(cfg["fit_pairs"] >= 0, f"fit_pairs={cfg['fit_pairs']}: give a number of pairs >= 0")
    for extra, key in ((cfg["train"], "train"), (cfg["eval"], "eval")):
        bad = [a for a in extra.split() if "=" not in a]
        common.check(not bad, f"{key}={extra!r}: give key=value overrides separated by spaces")
    path = result_path(cfg["out_dir"], "arc_cpu")
    runs = {s: os.path.join(cfg["out_dir"], f"seed{s}") for s in seeds}
    for run in runs.values():
        os.makedirs(run, exist_ok=True)
    recipe = dict(
        a.split("=", 1)
        for a in ARC_CPU_RECIPE
        + (f"max_steps={cfg['steps']}", f"ttt_steps={round(cfg['ttt'] * cfg['steps'])}")
        + tuple(cfg["train"].split())
    )
    train = [
        (
            [sys.executable, "train_arc.py", *(f"{k}={v}" for k, v in {**recipe, "seed": s, "out_dir": run}.items())],
            os.path.join(run, "train.log"),
        )
        for s, run in runs.items()
    ]
    recipe_line = " ".join(f"{k}={v}" for k, v in recipe.items())
    print(f"arc_cpu: training {len(seeds)} seed(s), {cfg['parallel']} at a time: {recipe_line}", flush=True)
    t0 = time.time()
    _run_all(train, cfg["parallel"], "training")
    train_min = (time.time() - t0) / 60 * cfg["parallel"] / len(seeds)  # per run, as if each had its core
    evals = [
        (
            [sys.executable, "evaluate.py", run, "mode=both", f"fit_pairs={cfg['fit_pairs']}", *cfg["eval"].split()],
            os.path.join(run, "eval.log"),
        )
        for run in runs.values()
    ]
    print(f"arc_cpu: trained in {train_min:.0f} min per run; evaluating", flush=True)
    t1 = time.time()
    _run_all(evals, cfg["parallel"], "evaluation")
    eval_min = (time.time() - t1) / 60 * cfg["parallel"] / len(seeds)
    results = {s: json.load(open(os.path.join(common.resolve_checkpoint(run), "eval.json"))) for s, run in runs.items()}
    table = arc_cpu_table(results)
    for line in table["lines"]:
        print(line)
    write_result(
        path,
        {
            **cfg,
            "recipe": recipe_line,
            "train_min_per_run": train_min,
            "eval_min_per_run": eval_min,
            "seeds_results": {str(s): r for s, r in results.items()},
            "mean": table["mean"],
        },
    )


def arc_cpu_table(results):
    """The ladder per seed and its mean: fractions, with pairs solved for pass@2 and the cells counted for cell
    accuracy; held-out and fit (seen) sets side by side."""
    mean, lines = {}, []
    sets = [("", "held-out")] + ([("fit_", "fit (seen)")] if all("fit_n_pairs" in r for r in results.values()) else [])
    for prefix, name in sets:
        n = next(iter(results.values()))[f"{prefix}n_pairs"]
        lines.append(f"{name} ({n} test pairs): " + ", ".join(f"seed {s}" for s in results) + ", mean")
        for key, label in ARC_CPU_LADDER:
            k = prefix + key
            values = [r[k] for r in results.values()]
            mean[k] = sum(values) / len(values)
            count = ARC_CPU_COUNTS.get(key)
            counts = [f" ({r[prefix + count]})" if count else "" for r in results.values()]
            lines.append(
                f"  {label:<38}"
                + "".join(f"{100 * v:>7.1f}%{c:<5}" for v, c in zip(values, counts))
                + f"{100 * mean[k]:>7.1f}%"
            )
    return {"mean": mean, "lines": lines}


# ----------------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------------

MODEL_BENCH = {  # key=value overrides of `python bench.py models`
    "BATCH": -1,  # images per training step / sampling call; -1: 32 on GPU, 4 on CPU
    "IMAGE_SIZE": 96,  # STL-10 resolution
    "ITERS": 3,  # timed iterations per measurement (after one warm-up)
    "SAMPLE_STEPS": 100,  # sampling steps behind "sample samples/s" (one CFG-batched forward per step)
    "BACKBONES": (  # which rows to run
        "unet",
        "dit",
        "uvit",
        "hdit",
        "localmamba",
        "mmdit",
        "diffusers_unet",
        "diffusers_dit",
        "diffusers_sd3",
    ),
    "OUT_DIR": ".",  # where bench_models.json goes
}
# The fixed STL-10 configuration: 96x96 RGB, 10 classes + null (text: an 8-token caption, a 384-d pooled vector),
# each backbone at the size train_stl10.py would use: name -> (model, preset, keyword arguments, condition).
BENCH_BACKBONES = {
    "unet": ("unet", "small", {"num_classes": 10}, "class"),
    "dit": ("dit", "S", {"num_classes": 10, "patch": 4}, "class"),
    "uvit": ("uvit", "small", {"num_classes": 10, "patch": 4}, "class"),
    "hdit": ("hdit", "eeg", {"num_classes": 10, "patch": 2}, "class"),
    "localmamba": ("localmamba", "eeg", {"num_classes": 10, "patch": 2}, "class"),
    "mmdit": ("mmdit", "S", {"context_dim": 384, "vector_dim": 384, "patch": 4}, "text"),
}
REFERENCES = {  # diffusers' models at matched size (see diffusers_reference): name -> the condition they take
    "diffusers_unet": "class",
    "diffusers_dit": "class",
    "diffusers_sd3": "text",
}
_CAPTION_TOKENS = 8


def diffusers_reference(name, image_size):
    """diffusers' UNet2DModel / DiTTransformer2DModel / SD3Transformer2DModel at about the parameter count of our
    unet small / DiT-S/4 / MMDiT-S/4, wrapped to our call model(x, t, cond); (None, reason) without diffusers."""
    try:
        import diffusers
    except ImportError:
        return None, "diffusers is not installed (pip install diffusers; a bench-only dependency)"
    if name == "diffusers_unet":  # channels 64-128-128-256, attention at the two coarsest levels, like unet small
        net = diffusers.UNet2DModel(
            sample_size=image_size,
            block_out_channels=(64, 128, 128, 256),
            down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
            attention_head_dim=32,
            num_class_embeds=11,
        )
        return (lambda x, t, cond: net(x, t * 1000, class_labels=cond).sample), net
    if name == "diffusers_sd3":  # MMDiT-S/4: 6 heads x 64, 12 joint blocks, 384-d caption tokens and pooled vector
        net = diffusers.SD3Transformer2DModel(
            sample_size=image_size,
            patch_size=4,
            in_channels=3,
            num_layers=12,
            attention_head_dim=64,
            num_attention_heads=6,
            joint_attention_dim=384,
            caption_projection_dim=384,
            pooled_projection_dim=384,
            out_channels=3,
            pos_embed_max_size=image_size // 4,
            qk_norm="rms_norm",  # as ours (SD3 sec. 5.3.2)
        )
        fn = lambda x, t, c: net(x, c["context"], c["vector"], t * 1000).sample
        return fn, net
    net = diffusers.DiTTransformer2DModel(  # DiT-S/4: 6 heads x 64, 12 layers
        num_attention_heads=6,
        attention_head_dim=64,
        in_channels=3,
        num_layers=12,
        sample_size=image_size,
        patch_size=4,
        num_embeds_ada_norm=11,
    )
    return (lambda x, t, cond: net(x, t * 1000, class_labels=cond).sample), net


def bench_conditions(kind, batch, dev):
    """(cond, null) for `batch` samples: class ids and the null class, or a caption (context, mask, pooled vector)
    and its dropped version (our models' learned null; diffusers' models get the zero caption)."""
    if kind == "class":
        return torch.randint(0, 10, (batch,), device=dev), torch.full((batch,), 10, device=dev)
    cond = {
        "context": torch.randn(batch, _CAPTION_TOKENS, 384, device=dev),
        "context_mask": torch.ones(batch, _CAPTION_TOKENS, dtype=torch.bool, device=dev),
        "vector": torch.randn(batch, 384, device=dev),
        "drop": torch.zeros(batch, dtype=torch.bool, device=dev),
    }
    null = {k: torch.zeros_like(v) for k, v in cond.items()} | {"drop": ~cond["drop"]}
    return cond, null


def _bench_one(args):
    """One backbone in a fresh process: training samples/s, sampling samples/s and peak memory."""
    name, batch, size, iters, sample_steps = args
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = memory_baseline(dev)
    if name in BENCH_BACKBONES:
        model_name, preset, kw, kind = BENCH_BACKBONES[name]
        net = fn = models.make_model(model_name, preset, **kw)
    else:
        (fn, net), kind = diffusers_reference(name, size), REFERENCES[name]
        if fn is None:
            return {"backbone": name, "skipped": net}
    net.to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x, t = torch.randn(batch, 3, size, size, device=dev), torch.rand(batch, device=dev)
    cond, null = bench_conditions(kind, batch, dev)
    autocast = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()

    def train_step():
        with autocast:
            loss = (fn(x, t, cond).float() - x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sample_call():  # one sampler step with CFG: both halves in one batched forward
        with torch.no_grad(), autocast:
            fn(torch.cat([x, x]), torch.cat([t, t]), common.cat_cond(cond, null))

    train_s = seconds_per_call(train_step, iters, dev)
    sample_s = seconds_per_call(sample_call, iters, dev)
    mem = common.peak_memory_mb(dev) - base
    return {
        "backbone": name,
        "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
        "train_samples_s": batch / train_s,
        "sample_samples_s": batch / (sample_s * sample_steps),
        "peak_mem_mib": mem,
    }


def bench_models(argv):
    """Per backbone at a fixed STL-10 configuration: training samples/s (forward, backward, AdamW), sampling
    samples/s (SAMPLE_STEPS CFG-batched forwards per sample) and peak memory (CUDA allocated, or on CPU the
    growth of the process's peak RSS), each backbone in a fresh process, diffusers' models alongside."""
    opts = common.apply_overrides(dict(MODEL_BENCH, __doc__=bench_models.__doc__), argv)
    common.check(opts["batch"] > 0 or opts["batch"] == -1, f"batch={opts['batch']}: give a positive number or -1")
    for key in ("iters", "sample_steps", "image_size"):
        common.check(opts[key] > 0, f"{key}={opts[key]}: give a positive number")
    common.check(opts["image_size"] % 16 == 0, f"image_size={opts['image_size']}: give a multiple of 16 (every row)")
    known = list(BENCH_BACKBONES) + list(REFERENCES)
    unknown = [b for b in opts["backbones"] if b not in known]
    if unknown:
        common.die(f"backbones={unknown}: choose from {', '.join(known)}")
    batch = opts["batch"] if opts["batch"] > 0 else (32 if torch.cuda.is_available() else 4)
    path = result_path(opts["out_dir"], "models")
    device = device_name()
    print(f"models: {opts['image_size']}x{opts['image_size']} RGB, 10 classes, batch {batch}, {device}", flush=True)
    rows = []
    for name in opts["backbones"]:
        row = in_fresh_process(_bench_one, (name, batch, opts["image_size"], opts["iters"], opts["sample_steps"]))
        if "skipped" in row:
            print(f"{name}: skipped, {row['skipped']}", flush=True)
        rows.append(row)
    header = f"{'backbone':<16}{'params (M)':>12}{'train img/s':>14}{'sample img/s':>14}{'peak MiB':>11}"
    print(header + f"\n{'-' * len(header)}")
    for r in rows:
        if "skipped" not in r:
            print(
                f"{r['backbone']:<16}{r['params_m']:>12.1f}{r['train_samples_s']:>14.2f}"
                f"{r['sample_samples_s']:>14.3f}{r['peak_mem_mib']:>11.0f}"
            )
    print(f"(sample img/s: images per second through {opts['sample_steps']} CFG steps)")
    write_result(path, {"batch": batch, "device": device, **opts, "rows": rows})


# ----------------------------------------------------------------------------------------------------------------
# scaling
# ----------------------------------------------------------------------------------------------------------------

SCALING_BENCH = {  # key=value overrides of `python bench.py scaling`
    "SIZES": (32, 64, 128, 256),  # image sides in pixels
    "PATCH": 4,  # the same patch for every backbone, so tokens = (side / PATCH)^2
    "BATCH": -1,  # images per training step; -1: 8 on GPU, 2 on CPU
    "ITERS": 2,  # timed training steps per size (after one warm-up)
    "BACKBONES": ("hdit", "localmamba", "dit", "dit_tiny"),  # which backbones to run
    "OUT_DIR": ".",  # where bench_scaling.json goes
}
SCALING_PRESETS = {  # name -> (model, preset): the reference EEG sizes; DiT-S beside them, and DiT-tiny (width 64),
    # whose global attention dominates its cost from a few hundred tokens on, so its quadratic growth shows early
    "hdit": ("hdit", "eeg"),
    "localmamba": ("localmamba", "eeg"),
    "dit": ("dit", "S"),
    "dit_tiny": ("dit", "tiny"),
}


def _scaling_one(args):
    """One training step (forward, backward, AdamW) of one backbone at one size, in a fresh process."""
    name, side, patch, batch, iters = args
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = memory_baseline(dev)
    net = models.make_model(*SCALING_PRESETS[name], patch=patch).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x, t = torch.randn(batch, 3, side, side, device=dev), torch.rand(batch, device=dev)
    autocast = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()

    def train_step():
        with autocast:
            loss = (net(x, t).float() - x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        step_s = seconds_per_call(train_step, iters, dev)
    except torch.OutOfMemoryError:
        return {"backbone": name, "side": side, "skipped": "out of memory"}
    return {"backbone": name, "side": side, "step_s": step_s, "peak_mem_mib": common.peak_memory_mb(dev) - base}


def scaling_exponent(tokens, values):
    """Least-squares slope of log(value) against log(tokens): ~1 linear, ~2 quadratic."""
    lx, ly = torch.tensor(tokens, dtype=torch.float64).log(), torch.tensor(values, dtype=torch.float64).log()
    lx = lx - lx.mean()
    return float((lx * (ly - ly.mean())).sum() / lx.square().sum())


def bench_scaling(argv):
    """Training step time and peak memory of HDiT and LocalMamba (the reference EEG sizes) beside DiT-S and DiT-tiny
    at the same patch, at growing image sides: HDiT's neighbourhood attention and LocalMamba's selective scan grow
    about linearly in the number of tokens, DiT's global attention quadratically once it dominates the cost. The
    exponent is the log-log slope over the two largest sizes that ran (the smallest are dominated by fixed costs).
    Memory stays near linear for every backbone: scaled_dot_product_attention never stores the L x L matrix."""
    opts = common.apply_overrides(dict(SCALING_BENCH, __doc__=bench_scaling.__doc__), argv)
    common.check(opts["batch"] > 0 or opts["batch"] == -1, f"batch={opts['batch']}: give a positive number or -1")
    unknown = [b for b in opts["backbones"] if b not in SCALING_PRESETS]
    if unknown:
        common.die(f"backbones={unknown}: choose from {', '.join(SCALING_PRESETS)}")
    for key in ("patch", "iters"):
        common.check(opts[key] > 0, f"{key}={opts[key]}: give a positive number")
    bad = [s for s in opts["sizes"] if not isinstance(s, int) or s <= 0 or s % (opts["patch"] * 8)]
    common.check(not bad, f"sizes={bad}: each side must be a positive multiple of 8 * patch ({8 * opts['patch']})")
    batch = opts["batch"] if opts["batch"] > 0 else (8 if torch.cuda.is_available() else 2)
    path = result_path(opts["out_dir"], "scaling")
    device = device_name()
    print(f"scaling: patch {opts['patch']}, batch {batch}, {device}", flush=True)
    rows, summary = [], {}
    for name in opts["backbones"]:
        for side in opts["sizes"]:
            rows.append(in_fresh_process(_scaling_one, (name, side, opts["patch"], batch, opts["iters"])))
            r, tokens = rows[-1], (side // opts["patch"]) ** 2
            r["tokens"] = tokens
            what = r["skipped"] if "skipped" in r else f"{r['step_s']:8.3f} s/step {r['peak_mem_mib']:8.0f} MiB"
            print(f"{name:<12}{side:>5}px {tokens:>7} tokens  {what}", flush=True)
        done = [r for r in rows if r["backbone"] == name and "skipped" not in r][-2:]
        if len(done) == 2:
            summary[name] = {
                "time_exponent": scaling_exponent([r["tokens"] for r in done], [r["step_s"] for r in done]),
                "memory_exponent": scaling_exponent([r["tokens"] for r in done], [r["peak_mem_mib"] for r in done]),
            }
            print(
                f"{name}: time ~ tokens^{summary[name]['time_exponent']:.2f}, memory ~ tokens^"
                f"{summary[name]['memory_exponent']:.2f} (between the two largest sizes)",
                flush=True,
            )
    write_result(path, {"batch": batch, "device": device, **opts, "rows": rows, "exponents": summary})


# ----------------------------------------------------------------------------------------------------------------
# mri
# ----------------------------------------------------------------------------------------------------------------

MRI_BENCH = {  # key=value overrides of `python bench.py mri`
    "IMAGE_SIZE": -1,  # 2D slice side in pixels; -1: 128 (the reference) on GPU, 64 on CPU
    "BATCH_2D": -1,  # slices per training step; -1: 16 on GPU (the reference), 2 on CPU
    "VOLUME": (-1,),  # 3D [D, H, W] voxels; (-1,): 160 x 256 x 256 (the reference) on GPU, 16 x 32 x 32 on CPU
    "BATCH_3D": 1,  # volumes per training step
    "ITERS": -1,  # timed training steps per case (after one warm-up); -1: 3 on GPU, 1 on CPU (seconds a step)
    "CASES": (  # which rows to run (MRI_CASES)
        "unet_2d",
        "monai_2d",
        "unet_3d",
        "unet_3d_ckpt",
        "unet_3d_s2d",
        "unet_3d_s2d_ckpt",
        "monai_3d",
    ),
    "OUT_DIR": ".",  # where bench_mri.json goes
}
MRI_CASES = {  # name -> (network, dims, space, gradient checkpointing); input: one image channel + its tumour mask
    "unet_2d": ("unet", 2, "pixel", False),
    "monai_2d": ("monai", 2, "pixel", False),
    "unet_3d": ("unet", 3, "pixel", False),
    "unet_3d_ckpt": ("unet", 3, "pixel", True),
    "unet_3d_s2d": ("unet", 3, "s2d", False),  # also stands for wavelet: the same shapes (see bench_mri)
    "unet_3d_s2d_ckpt": ("unet", 3, "s2d", True),
    "monai_3d": ("monai", 3, "pixel", False),
}


def monai_reference(dims):
    """MONAI's DiffusionModelUNet at the channels of our unet mri preset (128 / 256 / 256, attention at the two
    coarser levels, one ResBlock a level, GroupNorm 8, 8 heads of 32 at 256 channels, PyTorch's
    scaled_dot_product_attention as ours), image and mask concatenated at the input, wrapped to our call
    model(x, t, cond); (None, reason) without monai."""
    try:
        from monai.networks.nets import DiffusionModelUNet
    except ImportError as e:
        return None, f"monai is not importable ({e}); pip install --no-deps monai (a bench-only dependency)"
    net = DiffusionModelUNet(
        spatial_dims=dims,
        in_channels=2,
        out_channels=1,
        channels=(128, 256, 256),
        attention_levels=(False, True, True),
        num_res_blocks=1,
        norm_num_groups=8,
        num_head_channels=32,
        use_flash_attention=True,  # its default (False) stores the L x L attention matrix; ours never does
    )
    return (lambda x, t, cond: net(torch.cat([x, cond["concat"]], 1), t * 1000)), net


def _mri_one(args):
    """One MRI case in a fresh process: training step time (forward, backward, AdamW) and peak memory."""
    name, batch, side, iters = args
    kind, dims, space, checkpointing = MRI_CASES[name]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = memory_baseline(dev)
    factor = 1 if space == "pixel" else 2**dims  # s2d / wavelet: 2^dims channels at half the side
    shape = (batch, factor, *(side if space == "pixel" else [s // 2 for s in side]))  # (B, C, *spatial)
    if kind == "unet":
        kw = {"dims": dims, "in_channels": factor, "concat_channels": factor, "checkpointing": checkpointing}
        net = fn = models.make_model("unet", "mri", **kw)
    else:
        fn, net = monai_reference(dims)
        if fn is None:
            return {"case": name, "skipped": net}
    net.to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x, t = torch.randn(shape, device=dev), torch.rand(batch, device=dev)
    cond = {"concat": (torch.rand(shape, device=dev) < 0.05).float()}
    autocast = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()

    def train_step():
        with autocast:
            loss = (fn(x, t, cond).float() - x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    row = {
        "case": name,
        "input": [batch, 2 * factor, *shape[2:]],
        "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
    }
    try:
        step_s = seconds_per_call(train_step, iters, dev)
    except torch.OutOfMemoryError:
        return {**row, "skipped": "out of memory"}
    return {**row, "step_ms": 1000 * step_s, "peak_mem_mib": common.peak_memory_mb(dev) - base}


def bench_mri(argv):
    """The brain-MRI UNet (unet mri: 128 / 256 / 256, attention at the two coarser levels) beside MONAI's
    DiffusionModelUNet at matched channels, 2D slices and 3D volumes, one image channel + the tumour mask as
    input: training step time (forward, backward, AdamW; bf16 autocast on GPU) and peak memory (CUDA allocated, or
    on CPU the growth of the process's peak RSS), each case in a fresh process. On 3D volumes also gradient
    checkpointing on / off and the s2d space: 2 x 2 x 2 space-to-depth, 8 channels at half the side. The wavelet
    space feeds the network exactly the same shapes (one Haar level: 8 sub-bands at half the side), so the s2d rows
    stand for it too; the transform itself (a reshape, or an 8 x 8 matrix over each block) is left out."""
    opts = common.apply_overrides(dict(MRI_BENCH, __doc__=bench_mri.__doc__), argv)
    gpu = torch.cuda.is_available()
    for key in ("batch_2d", "image_size", "iters"):
        common.check(opts[key] > 0 or opts[key] == -1, f"{key}={opts[key]}: give a positive number or -1")
    common.check(opts["batch_3d"] > 0, f"batch_3d={opts['batch_3d']}: give a positive number")
    unknown = [c for c in opts["cases"] if c not in MRI_CASES]
    if unknown:
        common.die(f"cases={unknown}: choose from {', '.join(MRI_CASES)}")
    side_2d = opts["image_size"] if opts["image_size"] > 0 else (128 if gpu else 64)
    volume = opts["volume"] if opts["volume"] != (-1,) else ((160, 256, 256) if gpu else (16, 32, 32))
    common.check(side_2d % 4 == 0, f"image_size={side_2d}: give a multiple of 4 (two 2x downsamplings)")
    ok = len(volume) == 3 and all(s > 0 and s % 8 == 0 for s in volume)
    common.check(
        ok, f"volume={volume}: give [D, H, W], each a positive multiple of 8 (s2d halves, then 2 downsamplings)"
    )
    batch_2d = opts["batch_2d"] if opts["batch_2d"] > 0 else (16 if gpu else 2)
    iters = opts["iters"] if opts["iters"] > 0 else (3 if gpu else 1)
    path = result_path(opts["out_dir"], "mri")
    device = device_name()
    shape_3d = "x".join(map(str, volume))
    print(f"mri: 2D {side_2d}x{side_2d} batch {batch_2d}, 3D {shape_3d} batch {opts['batch_3d']}, {device}")
    header = f"{'case':<18}{'input (B x C x ...)':>22}{'params (M)':>12}{'step ms':>10}{'peak MiB':>10}"
    print(header + f"\n{'-' * len(header)}", flush=True)
    rows = []
    for name in opts["cases"]:
        batch, side = (batch_2d, (side_2d,) * 2) if MRI_CASES[name][1] == 2 else (opts["batch_3d"], volume)
        rows.append(in_fresh_process(_mri_one, (name, batch, side, iters)))
        r = rows[-1]
        if "skipped" in r and "input" not in r:
            print(f"{name:<18}  skipped: {r['skipped']}", flush=True)
            continue
        what = f"  skipped: {r['skipped']}" if "skipped" in r else f"{r['step_ms']:>10.0f}{r['peak_mem_mib']:>10.0f}"
        print(f"{name:<18}{'x'.join(map(str, r['input'])):>22}{r['params_m']:>12.1f}{what}", flush=True)
    resolved = {"image_size": side_2d, "batch_2d": batch_2d, "volume": volume, "iters": iters}
    write_result(path, {"device": device, **opts, **resolved, "rows": rows})


# ----------------------------------------------------------------------------------------------------------------
# vae
# ----------------------------------------------------------------------------------------------------------------

VAE_BENCH = {  # key=value overrides of `python bench.py vae`
    "IMAGE_SIZE": 96,  # 2D side in pixels (STL-10 96 x 96 RGB)
    "BATCH_2D": -1,  # images per call; -1: 32 on GPU, 2 on CPU
    "VOLUME": (-1,),  # 3D [D, H, W] voxels, one channel; (-1,): 64 x 128 x 128 on GPU, 16 x 32 x 32 on CPU
    "BATCH_3D": 1,  # volumes per call
    "ITERS": -1,  # timed calls per measurement (after one warm-up); -1: 3 on GPU, 1 on CPU (seconds a step)
    "CASES": (  # which rows to run (VAE_CASES)
        "klvae_2d",
        "diffusers_2d",
        "monai_2d",
        "vqvae_2d",
        "dcae_2d",
        "klvae_3d",
        "monai_3d",
    ),
    "OUT_DIR": ".",  # where bench_vae.json goes
}
VAE_CASES = {  # name -> (network, dims, our preset, keyword arguments); a reference takes the shape of our klvae at
    # that preset (see vae_reference). klvae base is the Stable Diffusion VAE (128 / 256 / 512 / 512, 2 ResBlocks a
    # level, latent 4, factor 8), vqvae base LDM's VQ-f4, dcae f32 the paper's f32c32; the 3D rows (klvae small:
    # 64 / 128 / 128, factor 4) run one channel with the mid attention off, as on MRI volumes
    "klvae_2d": ("klvae", 2, "base", {}),
    "diffusers_2d": ("diffusers", 2, "base", {}),
    "monai_2d": ("monai", 2, "base", {}),
    "vqvae_2d": ("vqvae", 2, "base", {}),
    "dcae_2d": ("dcae", 2, "f32", {}),
    "klvae_3d": ("klvae", 3, "small", {"in_channels": 1, "attention": False}),
    "monai_3d": ("monai", 3, "small", {"in_channels": 1, "attention": False}),
}
_KL_WEIGHT = 1e-6  # the LDM autoencoders' KL weight (Rombach et al. 2022); only the work matters here, not the value


def vae_reference(kind, dims, cfg):
    """diffusers' AutoencoderKL (2D only) or MONAI's AutoencoderKL at the shape of our klvae config `cfg` (widths
    channels * ch_mult, num_res_blocks, latent channels, mid-block attention on / off, no attention inside the
    levels, GroupNorm 32), as (net, reconstruct(x), loss(x)); (None, reason) when the package is missing. loss is
    L1 + _KL_WEIGHT * KL on a posterior sample, as for ours. MONAI's constructor gives its decoder num_res_blocks
    ResBlocks a level where LDM's (ours, diffusers') has num_res_blocks + 1; its decoder is rebuilt from its own
    Decoder class with num_res_blocks + 1, so all three are the same network (equal parameters, equal FLOPs)."""
    widths = tuple(cfg["channels"] * m for m in cfg["ch_mult"])
    io = {"in_channels": cfg["in_channels"], "out_channels": cfg.get("out_channels") or cfg["in_channels"]}
    if kind == "diffusers":
        try:
            from diffusers import AutoencoderKL
        except ImportError as e:
            return None, f"diffusers is not importable ({e}); pip install diffusers (a bench-only dependency)"
        net = AutoencoderKL(
            **io,
            down_block_types=("DownEncoderBlock2D",) * len(widths),
            up_block_types=("UpDecoderBlock2D",) * len(widths),
            block_out_channels=widths,
            layers_per_block=cfg["num_res_blocks"],
            latent_channels=cfg["latent_channels"],
            mid_block_add_attention=cfg["attention"],
        )

        def loss(x):
            posterior = net.encode(x).latent_dist
            x_hat = net.decode(posterior.sample()).sample
            return (x_hat.float() - x).abs().mean() + _KL_WEIGHT * posterior.kl().mean()

        return net, (lambda x: net.decode(net.encode(x).latent_dist.mode()).sample), loss
    try:
        from monai.networks.blocks import SpatialAttentionBlock
        from monai.networks.nets import AutoencoderKL
        from monai.networks.nets.autoencoderkl import Decoder
    except ImportError as e:
        return None, f"monai is not importable ({e}); pip install --no-deps monai (a bench-only dependency)"
    shape = {  # use_flash_attention: PyTorch's scaled_dot_product_attention, as ours; its default stores L x L
        "spatial_dims": dims,
        "channels": widths,
        "attention_levels": (False,) * len(widths),
        "use_flash_attention": True,
    }
    net = AutoencoderKL(
        **shape,
        **io,
        num_res_blocks=cfg["num_res_blocks"],
        latent_channels=cfg["latent_channels"],
    )
    net.decoder = Decoder(
        **shape,
        in_channels=cfg["latent_channels"],
        out_channels=io["out_channels"],
        num_res_blocks=(cfg["num_res_blocks"] + 1,) * len(widths),
        norm_num_groups=32,
        norm_eps=1e-6,
    )
    if not cfg["attention"]:  # MONAI's switch drops the whole middle; ours keeps its two ResBlocks, so does this
        for blocks in (net.encoder.blocks, net.decoder.blocks):
            for i, block in enumerate(blocks):
                blocks[i] = torch.nn.Identity() if isinstance(block, SpatialAttentionBlock) else block

    def loss(x):
        x_hat, mu, sigma = net(x)
        kl = 0.5 * (mu.float().square() + sigma.float().square() - 2 * sigma.float().log() - 1).flatten(1).sum(1)
        return (x_hat.float() - x).abs().mean() + _KL_WEIGHT * kl.mean()

    return net, net.reconstruct, loss


def vae_config(name):
    """The resolved constructor arguments of case `name`'s network (its class defaults, the preset, then the case's
    keywords); a reference case gets those of our klvae, whose shape it takes."""
    kind, dims, preset, kw = VAE_CASES[name]
    cls = models.MODELS["klvae" if kind in ("diffusers", "monai") else kind]
    defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}
    return {**defaults, **cls.PRESETS[preset], "dims": dims, **kw}


def ours_calls(net):
    """(reconstruct(x), loss(x)) for our autoencoders: L1 reconstruction + _KL_WEIGHT * KL (klvae) or the
    commitment loss (vqvae; the codebook itself is an EMA update) or nothing more (dcae)."""

    def loss(x):
        x_hat, aux = net(x)
        rec = (x_hat.float() - x).abs().mean()
        if "kl" in aux:
            return rec + _KL_WEIGHT * aux["kl"].mean()
        return rec + aux["vq_loss"] if "vq_loss" in aux else rec

    return (lambda x: net.decode(net.encode(x))), loss


def _vae_one(args):
    """One autoencoder case in a fresh process: encode + decode samples/s (eval, no gradients), training samples/s
    (forward, L1 + KL / VQ terms, backward, AdamW) and the peak memory of each."""
    name, batch, spatial, iters = args
    (kind, dims, preset, kw), cfg = VAE_CASES[name], vae_config(name)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = memory_baseline(dev)
    if kind in ("diffusers", "monai"):
        net, *calls = vae_reference(kind, dims, cfg)
        if net is None:
            return {"case": name, "skipped": calls[0]}
    else:
        net = models.make_model(kind, preset, dims=dims, **kw)
        calls = ours_calls(net)
    reconstruct, loss_fn = calls
    net.to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.rand(batch, cfg["in_channels"], *spatial, device=dev) * 2 - 1  # images in [-1, 1]
    autocast = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()

    def encode_decode():
        with torch.no_grad(), autocast:
            reconstruct(x)

    def train_step():
        with autocast:
            loss = loss_fn(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    row = {
        "case": name,
        "input": [batch, cfg["in_channels"], *spatial],
        "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
    }
    try:
        net.eval()
        eval_s = seconds_per_call(encode_decode, iters, dev)
        eval_mem = common.peak_memory_mb(dev) - base
        net.train()
        base = memory_baseline(dev) if dev.type == "cuda" else base  # CPU: the peak RSS only grows, so one baseline
        train_s = seconds_per_call(train_step, iters, dev)
    except torch.OutOfMemoryError:
        return {**row, "skipped": "out of memory"}
    train_mem = common.peak_memory_mb(dev) - base
    return {
        **row,
        "encode_decode_samples_s": batch / eval_s,
        "train_samples_s": batch / train_s,
        "eval_peak_mem_mib": eval_mem,
        "train_peak_mem_mib": train_mem,
    }


def bench_vae(argv):
    """Our autoencoders (klvae at the Stable Diffusion VAE shape, vqvae, dcae f32) on STL-10 96 x 96 RGB images and
    klvae on one-channel MRI volumes, beside diffusers' AutoencoderKL (2D only) and MONAI's AutoencoderKL at the
    same shape: encode + decode samples/s (eval, no gradients; the KL-VAEs decode the posterior mean), training
    samples/s (forward on a posterior sample, L1 + KL or VQ terms, backward, AdamW; bf16 autocast on GPU) and peak
    memory of each (CUDA allocated, or on CPU the growth of the process's peak RSS, which only grows: the train
    column covers both), each case in a fresh process."""
    opts = common.apply_overrides(dict(VAE_BENCH, __doc__=bench_vae.__doc__), argv)
    gpu = torch.cuda.is_available()
    for key in ("batch_2d", "iters"):
        common.check(opts[key] > 0 or opts[key] == -1, f"{key}={opts[key]}: give a positive number or -1")
    common.check(opts["batch_3d"] > 0, f"batch_3d={opts['batch_3d']}: give a positive number")
    unknown = [c for c in opts["cases"] if c not in VAE_CASES]
    if unknown:
        common.die(f"cases={unknown}: choose from {', '.join(VAE_CASES)}")
    needed = {"klvae"} | {VAE_CASES[c][0] for c in opts["cases"]} - {"diffusers", "monai"}  # references: klvae's shape
    missing = sorted(needed - set(models.MODELS))
    common.check(not missing, f"models.py has no {', '.join(missing)} entry")
    side = opts["image_size"]
    volume = opts["volume"] if opts["volume"] != (-1,) else ((64, 128, 128) if gpu else (16, 32, 32))
    common.check(len(volume) == 3, f"volume={volume}: give [D, H, W]")
    for name in opts["cases"]:  # every side a multiple of the case's factor, before any work
        cfg = vae_config(name)
        factor = models.autoencoder_factor(cfg["dims"], cfg["ch_mult"], cfg["factor"])
        spatial, what = ((side,), f"image_size={side}") if cfg["dims"] == 2 else (volume, f"volume={volume}")
        common.check(all(s > 0 and s % factor == 0 for s in spatial), f"{what}: {name} needs multiples of {factor}")
    batch_2d = opts["batch_2d"] if opts["batch_2d"] > 0 else (32 if gpu else 2)
    iters = opts["iters"] if opts["iters"] > 0 else (3 if gpu else 1)
    path = result_path(opts["out_dir"], "vae")
    device = device_name()
    print(
        f"vae: 2D {side}x{side} RGB batch {batch_2d}, 3D {'x'.join(map(str, volume))} batch {opts['batch_3d']}, {device}"
    )
    header = (
        f"{'case':<14}{'input (B x C x ...)':>20}{'params (M)':>12}{'enc+dec /s':>12}{'train /s':>10}"
        f"{'eval MiB':>10}{'train MiB':>11}"
    )
    print(header + f"\n{'-' * len(header)}", flush=True)
    rows = []
    for name in opts["cases"]:
        batch, spatial = (batch_2d, (side, side)) if VAE_CASES[name][1] == 2 else (opts["batch_3d"], volume)
        rows.append(in_fresh_process(_vae_one, (name, batch, spatial, iters)))
        r = rows[-1]
        if "skipped" in r and "input" not in r:
            print(f"{name:<14}  skipped: {r['skipped']}", flush=True)
            continue
        what = (
            f"  skipped: {r['skipped']}"
            if "skipped" in r
            else f"{r['encode_decode_samples_s']:>12.3f}{r['train_samples_s']:>10.3f}"
            f"{r['eval_peak_mem_mib']:>10.0f}{r['train_peak_mem_mib']:>11.0f}"
        )
        print(f"{name:<14}{'x'.join(map(str, r['input'])):>20}{r['params_m']:>12.2f}{what}", flush=True)
    resolved = {"batch_2d": batch_2d, "volume": volume, "iters": iters}
    write_result(path, {"device": device, **opts, **resolved, "rows": rows})


BENCHES = {  # name -> (function(argv), its options, the name of that dict in this file)
    "samplers": (bench_samplers, SAMPLER_BENCH, "SAMPLER_BENCH"),
    "arc": (bench_arc, ARC_BENCH, "ARC_BENCH"),
    "arc_cpu": (bench_arc_cpu, ARC_CPU, "ARC_CPU"),
    "models": (bench_models, MODEL_BENCH, "MODEL_BENCH"),
    "scaling": (bench_scaling, SCALING_BENCH, "SCALING_BENCH"),
    "mri": (bench_mri, MRI_BENCH, "MRI_BENCH"),
    "vae": (bench_vae, VAE_BENCH, "VAE_BENCH"),
}


def main(argv):
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip())
        return
    if argv[0] not in BENCHES:
        common.die(f"unknown benchmark {argv[0]!r}; choose one of {', '.join(BENCHES)}")
    bench, options, name = BENCHES[argv[0]]
    if any(a in ("-h", "--help", "help") for a in argv[1:]):
        namespace = {**options, "__doc__": inspect.cleandoc(bench.__doc__), "__file__": __file__, "__options__": name}
        common.print_help(namespace, f"python bench.py {argv[0]} key=value")
        return
    bench(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
