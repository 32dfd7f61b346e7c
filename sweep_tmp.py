import json, os, sys, time, multiprocessing as mp
sys.path.insert(0, os.getcwd())
def one(args):
    exp, row, ov = args
    from ssmkit.training.reproduce import run_row
    t0 = time.time()
    try:
        r = run_row(exp, row, "default", threads=1, overrides=ov, progress=False)
    except Exception as e:
        import traceback; r = {"error": traceback.format_exc()[-2000:]}
    r["wall"] = time.time() - t0; r["ov"] = ov; r["exp"] = exp; r["row_"] = row
    print(json.dumps({k: r.get(k) for k in ("exp", "row_", "ov", "acc", "steps", "train_seconds", "curve", "error", "wall")}), flush=True)
    return r
if __name__ == "__main__":
    NS = {"stop_at_acc": None}
    SC = "selective-copying"; IH = "induction-heads"
    base = dict(steps=1000, eval_every=100, **NS)
    small = dict(dt_range=(1e-4, 1e-2))
    jobs = [(IH, "mamba", dict(base)),
            (IH, "mamba", dict(base, **small)),
            (IH, "mamba", dict(base, dt_range=(1e-4, 1e-1))),
            (IH, "mamba", dict(base, d_model=32, d_state=8)),
            (IH, "mamba", dict(base, d_model=32, d_state=8, **small)),
            (IH, "mamba", dict(base, weight_decay=0.0)),
            (IH, "mamba2", dict(base, **small)),
            (IH, "s6", dict(base, **small)),
            (IH, "mamba", dict(base, task={"length": 16}, **small)),
            (SC, "mamba", dict(base, d_model=32, d_state=8)),
            (SC, "s6", dict(base, d_model=32, d_state=8, lr=1e-3)),
            (SC, "s4d", dict(base, task={"length": 128, "n_tokens": 8})),
            (SC, "s4d", dict(base, d_model=32, d_state=8)),
            (SC, "mamba", dict(base, **small)),
            (SC, "s6", dict(base, lr=1e-3, **small)),
            (SC, "s4d", dict(base, task={"length": 64, "n_tokens": 8})),
            ]
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    with mp.get_context("spawn").Pool(n) as pool:
        res = pool.map(one, jobs, chunksize=1)
    json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "sweep.json"), "w"), indent=1)
