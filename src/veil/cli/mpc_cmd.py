"""``veil mpc ...``: secret-shared inference between two servers and a dealer.

* ``veil mpc run MODEL [--inputs FILE]``: the five parties as threads in this process; prints the
  report next to plaintext (agreement, error, time, bytes, rounds).
* ``veil mpc local MODEL [--inputs FILE]``: the five parties as processes over mutual TLS on loopback.
* ``veil mpc plan MODEL``: the compiled program with each step's declared rounds and bytes.
* ``veil mpc encode --text ... [--deployment FILE]``: MiniLM sentence embeddings, five local processes over
  mutual TLS (or the user of a deployment); the padding mask is a public input of the model.
* ``veil mpc generate [--llama2c FILE] --steps N [--deployment FILE]``: greedy decoding, the key/value cache
  as shares on the servers.
* The parties of a real deployment run with ``veil party --deployment FILE --as NAME`` (see docs/mpc.md).

MODEL is an ONNX file or a shipped network name (A, B, C, D); without ``--inputs`` the shipped
held-out MNIST slice is used.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

__all__ = ["app"]

app = typer.Typer(help="mpc mode: two non-colluding servers and a dealer compute on secret shares.",
                  no_args_is_help=True)
console = Console()


def _model(model: str) -> Path:
    from veil.assets import NETWORKS, model_path

    if model.upper() in NETWORKS and not Path(model).exists():
        return model_path(model)
    if not Path(model).exists():
        from veil.errors import OptionError

        raise OptionError(f"model {model!r}: no such file; expected an ONNX file or a shipped network "
                          f"({', '.join(sorted(NETWORKS))})")
    return Path(model)


def _inputs(inputs: Path | None, n: int) -> tuple[Any, np.ndarray | None]:
    if inputs is None:
        from veil.assets import load_slice

        return load_slice(n)
    from veil.mpc.party import load_inputs

    return load_inputs(inputs), None


@app.command()
def run(model: str = typer.Argument(..., help="ONNX file or shipped network A-D"),
        inputs: Path = typer.Option(None, help=".npy/.npz inputs (default: the shipped held-out slice)"),
        n: int = typer.Option(64, help="images from the shipped slice when --inputs is not given"),
        batch_size: int = typer.Option(None, help="samples per query (default: all at once)"),
        frac_bits: int = typer.Option(16, help="fractional bits of the fixed-point format"),
        out: Path = typer.Option(None, help="write the outputs to this .npz file")) -> None:
    """Run MODEL under mpc with the parties as threads and compare with plaintext."""
    import veil.mpc as M

    x, y = _inputs(inputs, n)
    pred, rep = M.run(str(_model(model)), x, frac_bits=frac_bits, batch_size=batch_size)
    t = Table(title=f"mpc: {Path(str(_model(model))).name}, {rep.images} samples")
    t.add_column("metric")
    t.add_column("value")
    rows = [("online time", f"{rep.online_s * 1e3:.1f} ms"), ("offline time", f"{rep.offline_s * 1e3:.1f} ms"),
            ("plaintext time", f"{(rep.plain_s or 0) * 1e3:.1f} ms"), ("online bytes", f"{rep.online_bytes / 1e6:.2f} MB"),
            ("offline bytes", f"{rep.offline_bytes / 1e6:.2f} MB"), ("rounds", str(rep.rounds)),
            ("agreement with plaintext", f"{rep.agreement:.2%}"), ("max |error|", f"{rep.max_abs_error:.2e}")]
    if y is not None and isinstance(pred, np.ndarray):
        rows.append(("accuracy (held-out slice)", f"{(pred.argmax(-1) == y).mean():.2%}"))
    for r in rows:
        t.add_row(*r)
    console.print(t)
    if out is not None:
        np.savez(out, **(pred if isinstance(pred, dict) else {"output": pred}))


@app.command()
def local(model: str = typer.Argument(..., help="ONNX file or shipped network A-D"),
          inputs: Path = typer.Option(None, help=".npy/.npz inputs (default: the shipped held-out slice)"),
          n: int = typer.Option(64, help="images from the shipped slice when --inputs is not given"),
          batch_size: int = typer.Option(None, help="samples per query (default: all at once)"),
          timeout: float = typer.Option(600, help="seconds before every party is stopped")) -> None:
    """Run MODEL with five local processes over mutual TLS."""
    from veil.graph import load_model
    from veil.mpc.demo import run_local_deployment
    from veil.plain import check_inputs

    x, y = _inputs(inputs, n)
    check_inputs(load_model(_model(model)), x)  # a wrong shape is refused before any process starts
    with tempfile.TemporaryDirectory(prefix="veil-mpc-") as tmp:
        res = run_local_deployment(_model(model), x, tmp, batch_size=batch_size, timeout=timeout)
    rep = res["report"]
    console.print(f"online {rep['online_s'] * 1e3:.1f} ms, offline {rep['offline_s'] * 1e3:.1f} ms, "
                  f"{rep['online_bytes'] / 1e6:.2f} MB online, {rep['offline_bytes'] / 1e6:.2f} MB offline, "
                  f"{rep['rounds']} rounds")
    out = next(iter(res["outputs"].values()))
    if y is not None:
        console.print(f"accuracy on the held-out slice: {(out.argmax(-1) == y).mean():.2%}")


@app.command()
def plan(model: str = typer.Argument(..., help="ONNX file or shipped network A-D"),
         batch_size: int = typer.Option(1, "--batch-size", help="samples per query"),
         batch: int = typer.Option(None, "--batch", hidden=True, help="old name of --batch-size")) -> None:
    """Show the compiled server program and each step's declared cost."""
    from veil.graph import load_model
    from veil.mpc import FixedPoint, compile_program
    from veil.options import check_int

    batch = check_int(batch if batch is not None else batch_size, "--batch-size", 1)

    prog = compile_program(load_model(_model(model)), batch, FixedPoint())
    t = Table(title=f"mpc program, batch {batch}")
    for c in ("step", "rounds", "bytes per server"):
        t.add_column(c)
    for ins in prog.instrs:
        if ins.cost.rounds:
            t.add_row(ins.name, str(ins.cost.rounds), f"{ins.cost.bytes:,}")
    total = prog.cost
    t.add_row("[bold]total[/]", str(total.rounds), f"{total.bytes:,}")
    console.print(t)


@app.command()
def encode(text: list[str] = typer.Option(..., "--text", "-t", help="a sentence to embed (repeat for several)"),
           seq_len: int = typer.Option(None, "--seq-len", help="tokens per sentence (padded/truncated; public); default "
                                       "16, or the deployment's seq_len option"),
           out: Path = typer.Option(None, "--out", help="write the embeddings to a .npy or .json file"),
           frac_bits: int = typer.Option(16, help="fractional bits of the fixed-point format"),
           deployment: Path = typer.Option(None, "--deployment", "-d", help="be the user of this deployment (its other "
                                           "four parties run `veil party`); its options set seq_len and batch_size"),
           compare: bool = typer.Option(True, "--compare/--no-compare", help="also run the public model in plaintext "
                                        "here and print each embedding's cosine with it"),
           timeout: float = typer.Option(900, help="seconds before every party is stopped")) -> None:
    """MiniLM (all-MiniLM-L6-v2) sentence embeddings under mpc: five local processes over mutual TLS, or
    the user of a deployment (--deployment)."""
    import json

    from veil.errors import InputError
    from veil.models.secure import encode_deployment, encode_local
    from veil.options import check_int

    if seq_len is not None:
        seq_len = check_int(seq_len, "--seq-len", 2, 512)
    if out is not None and out.suffix not in (".npy", ".json"):
        raise InputError(f"--out {out.name!r}: expected a .npy or .json file")
    if deployment is not None:
        res = encode_deployment(deployment, text, timeout=timeout, compare=compare, seq_len=seq_len)
    else:
        with tempfile.TemporaryDirectory(prefix="veil-mpc-encode-") as tmp:
            res = encode_local(text, tmp, seq_len=seq_len or 16, frac_bits=frac_bits, timeout=timeout, compare=compare)
    rep, emb, cos = res["report"], res["embedding"], res["cosine"]
    t = Table(title=f"all-MiniLM-L6-v2 under mpc: {len(text)} sentence(s), sequence length {res['seq_len']}")
    for c in ("sentence", "tokens", "embedding[:3]", "cosine vs plaintext"):
        t.add_column(c)
    for i, (s, n, e) in enumerate(zip(res["texts"], res["tokens"], emb, strict=True)):
        t.add_row(s if len(s) <= 40 else s[:37] + "...", str(n), " ".join(f"{v:+.3f}" for v in e[:3]),
                  "-" if cos is None else f"{cos[i]:.6f}")
    console.print(t)
    console.print(f"online {rep['online_s']:.2f} s, offline {rep['offline_s']:.2f} s, whole run {res['wall_s']:.1f} s; "
                  f"{rep['online_bytes'] / 1e6:.1f} MB online, {rep['offline_bytes'] / 1e6:.1f} MB offline, "
                  f"{rep['setup_bytes'] / 1e6:.1f} MB setup; {rep['rounds']} rounds; public: sequence length and "
                  "each sentence's number of tokens")
    if out is not None:
        if out.suffix == ".npy":
            np.save(out, emb)
        else:
            out.write_text(json.dumps({"texts": res["texts"], "seq_len": res["seq_len"], "embedding": emb.tolist(),
                                       "cosine_vs_plain": None if cos is None else cos.tolist()}))
        console.print(f"wrote {len(emb)} embeddings of {emb.shape[1]} values to {out}")


@app.command()
def generate(llama2c: Path = typer.Option(None, "--llama2c", help="llama2.c checkpoint (default: the shipped stories260K)"),
             steps: int = typer.Option(20, "--steps", help="tokens to generate"),
             bos: int = typer.Option(1, "--bos", help="the first token id"),
             frac_bits: int = typer.Option(16, help="fractional bits of the fixed-point format"),
             deployment: Path = typer.Option(None, "--deployment", "-d", help="be the user of this deployment (its other "
                                             "four parties run `veil party`; the owner's llama2c and steps options); "
                                             "--llama2c then only serves the plaintext comparison"),
             timeout: float = typer.Option(900, help="seconds before every party is stopped")) -> None:
    """Greedy generation under mpc (key/value cache as shares on the servers): five local processes over
    mutual TLS, or the user of a deployment (--deployment)."""
    from veil.models.secure import generate_deployment, generate_local

    if deployment is not None:
        res = generate_deployment(deployment, steps, prompt=(bos,), checkpoint=llama2c, timeout=timeout)
    else:
        if llama2c is None:
            from veil.assets import stories260k_path

            llama2c = stories260k_path()
        with tempfile.TemporaryDirectory(prefix="veil-mpc-generate-") as tmp:
            res = generate_local(llama2c, steps, tmp, prompt=(bos,), frac_bits=frac_bits, timeout=timeout)
    rep, n = res["report"], len(res["ids"])
    console.print(f"[bold]{res['model']}[/] under mpc, {n} tokens from id {bos}:")
    console.print(" ".join(str(i) for i in res["ids"]))
    if res["plain_ids"] is not None:
        same = res["ids"] == res["plain_ids"]
        console.print(f"plaintext decoding gives {'the same ids' if same else 'different ids: ' + str(res['plain_ids'])}")
    console.print(f"per token: online {rep['online_s'] / n * 1e3:.0f} ms, offline {rep['offline_s'] / n * 1e3:.0f} ms; "
                  f"whole run {res['wall_s']:.1f} s; {rep['online_bytes'] / 1e6:.1f} MB online, "
                  f"{rep['offline_bytes'] / 1e6:.1f} MB offline, {rep['setup_bytes'] / 1e6:.1f} MB setup; "
                  f"{rep['rounds']} rounds")
