"""``veil permute ...``: the three STIP roles as commands.

Developer: ``keygen`` (draw the secret permutations), ``transform`` (write the cloud's model and the
user's key bundle), ``audit`` (run the attacks, print recovery rates).
Cloud: ``serve`` (HTTP or HTTPS server with KV-cache sessions and batching; optional client certificates).
User: ``generate`` (decoders) and ``encode`` (encoders) against a running cloud (``--ca`` etc. for HTTPS).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from veil.cli.error_line import error_line
from veil.errors import VeilError

__all__ = ["app"]

app = typer.Typer(help="Permute mode (STIP): secret permutations of a transformer's hidden dimension. "
                       "Obfuscation, not cryptography: see `veil permute audit`.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


def _clear_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VeilError as exc:
            err_console.print(error_line(str(exc)), soft_wrap=True)  # as veil.cli.main prints it, never wrapped
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@_clear_errors
def keygen(
    model: Path = typer.Option(..., help="Hugging Face model directory or llama2.c .bin"),
    out: Path = typer.Option(..., help="directory for the developer's key (keep it secret)"),
    mode: str = typer.Option("embed", help="embed: user holds embedding and head; vocab: user holds only keys"),
    hazmat_seed: int | None = typer.Option(None, help="fixed seed instead of OS randomness (tests only)"),
) -> None:
    """Draw a fresh hidden permutation (and a vocabulary permutation in vocab mode)."""
    from veil.permute.bundle import write_key
    from veil.permute.developer import make_key
    from veil.permute.models import load_source

    if hazmat_seed is not None:
        warnings.warn("hazmat_seed: the key is derived from a fixed seed and is NOT secret", stacklevel=1)
        err_console.print("[yellow]warning: --hazmat-seed makes the key predictable (tests only)[/yellow]")
    source = load_source(model)
    key, meta = make_key(source, mode, seed=hazmat_seed)
    write_key(out, key, meta)
    console.print(f"key for {meta['family']} (d={meta['hidden_size']}, vocab={meta['vocab_size']}, mode={mode}) "
                  f"written to {out}; key id {key.key_id}")


@app.command()
@_clear_errors
def transform(
    model: Path = typer.Option(..., help="Hugging Face model directory or llama2.c .bin"),
    key: Path = typer.Option(..., help="developer key directory from `keygen`"),
    cloud_out: Path = typer.Option(..., help="directory for the cloud's transformed model"),
    user_out: Path = typer.Option(..., help="directory for the user's key bundle (secret)"),
) -> None:
    """Transform MODEL with KEY; write the cloud package and the user bundle."""
    from veil.permute.bundle import read_key, read_signing_key, write_cloud_package, write_user_bundle
    from veil.permute.developer import make_packages
    from veil.permute.models import load_source
    from veil.permute.signing import public_key_hex

    pkey, meta = read_key(key)
    signing_key = read_signing_key(key)
    source = load_source(model)
    tok_dir = model if model.is_dir() else None
    cloud, user = make_packages(source, pkey, meta, tokenizer_dir=tok_dir)
    write_cloud_package(cloud_out, cloud, signing_key)
    write_user_bundle(user_out, user, signing_key)
    console.print(f"cloud model: {cloud_out} ({len(cloud.state_dict)} tensors); user bundle: {user_out} "
                  f"(mode {meta['mode']}); both signed by developer key\n{public_key_hex(signing_key)}")
    _print_verdict(source, pkey)


def _print_verdict(source, pkey) -> None:
    """What a cloud holding the public checkpoint recovers (printed by every transform)."""
    from veil.permute.audit import public_checkpoint_verdict

    results = public_checkpoint_verdict(source, pkey)
    err_console.print("[bold yellow]verdict: if this checkpoint (or the base it was fine-tuned from) is public, "
                      "the cloud can undo the transform:[/bold yellow]")
    for r in results:
        err_console.print(f"[yellow]  {r.attack} from {r.attacker_knows}: {100 * r.recovered:.1f}% of "
                          f"{r.detail} recovered[/yellow]")
    err_console.print("[yellow]  permute mode protects only privately trained weights; run `veil permute audit` "
                      "for the full picture (docs/permute.md)[/yellow]")


@app.command()
@_clear_errors
def serve(
    cloud: Path = typer.Option(..., help="cloud package directory from `transform`"),
    host: str = typer.Option("127.0.0.1", help="address to bind (loopback by default)"),
    port: int = typer.Option(8470, help="TCP port"),
    max_batch: int = typer.Option(16, help="most session steps run as one batch"),
    window_ms: float = typer.Option(0.0, help="wait this long for more steps before running a batch"),
    threads: int = typer.Option(0, help="torch threads (0: default)"),
    developer_key: str | None = typer.Option(None, help="require the developer's signature (hex public key)"),
    tls_cert: Path | None = typer.Option(None, help="server certificate (PEM, e.g. from `veil keys`): serve HTTPS"),
    tls_key: Path | None = typer.Option(None, help="private key of --tls-cert (PEM)"),
    tls_client_ca: Path | None = typer.Option(None, help="require client certificates issued by this CA (PEM)"),
) -> None:
    """Serve the transformed model over HTTP, or HTTPS with --tls-cert/--tls-key."""
    from veil.permute.server import serve as run_server
    from veil.permute.server import tls_options

    def opt(p: Path | None) -> str | None:
        return None if p is None else str(p)

    from veil.net.ports import check_can_listen

    tls_options(opt(tls_cert), opt(tls_key), opt(tls_client_ca))  # clear errors before loading the model
    check_can_listen(host, port)  # a port in use is one error line, not uvicorn's log and exit code 3
    scheme = "https" if tls_cert is not None else "http"
    extra = " (client certificates required)" if tls_client_ca is not None else ""

    def announce() -> None:  # only once the package is read and verified: a bad --cloud is the only line
        console.print(f"serving {cloud} on {scheme}://{host}:{port}{extra}")
        if scheme == "http":
            err_console.print("[yellow]plain HTTP: traffic is unencrypted and the cloud is not authenticated; "
                              "use --tls-cert/--tls-key beyond this machine[/yellow]")

    run_server(str(cloud), host, port, max_batch, window_ms, threads, developer_key, tls_cert=opt(tls_cert),
               tls_key=opt(tls_key), tls_client_ca=opt(tls_client_ca), on_ready=announce)


def _connect(user: Path, url: str, developer_key: str | None, ca: Path | None = None,
             server_name: str | None = None, client_cert: Path | None = None, client_key: Path | None = None):
    from veil.errors import InputError
    from veil.permute.bundle import read_user_bundle
    from veil.permute.client import HttpTransport, PermuteClient

    if (client_cert is None) != (client_key is None):
        raise InputError("--client-cert and --client-key go together")
    pair = None if client_cert is None or client_key is None else (client_cert, client_key)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        transport = HttpTransport(url, ca=ca, server_name=server_name, client_cert=pair)
    for w in caught:
        err_console.print(f"[yellow]warning: {w.message}[/yellow]")
    try:
        return PermuteClient(read_user_bundle(user, developer_key), transport)
    except BaseException:
        transport.close()
        raise


_DEV_KEY = typer.Option(None, help="require the developer's signature on the bundle (hex public key)")
_CA = typer.Option(None, help="https: trust only this CA (PEM) for the cloud's certificate")
_SERVER_NAME = typer.Option(None, help="https: name the cloud's certificate must carry if not the URL's host "
                                       "(e.g. its party name in `veil keys`)")
_CLIENT_CERT = typer.Option(None, help="https: this user's certificate (PEM), for a cloud that requires one")
_CLIENT_KEY = typer.Option(None, help="private key of --client-cert (PEM)")


@app.command()
@_clear_errors
def generate(
    user: Path = typer.Option(..., help="user key bundle"),
    url: str = typer.Option("http://127.0.0.1:8470", help="the cloud's address (https://... with --ca)"),
    prompt_ids: str = typer.Option("", help="space-separated prompt token ids (default: BOS)"),
    max_new_tokens: int = typer.Option(64, help="tokens to generate"),
    stop_at_eos: bool = typer.Option(False, help="stop at the model's EOS token"),
    developer_key: str | None = _DEV_KEY,
    ca: Path | None = _CA,
    server_name: str | None = _SERVER_NAME,
    client_cert: Path | None = _CLIENT_CERT,
    client_key: Path | None = _CLIENT_KEY,
) -> None:
    """Greedy generation through the cloud: one round trip per token, KV cache on the cloud."""
    import time

    from veil.errors import InputError

    try:
        prompt = [int(t) for t in prompt_ids.split()]
    except ValueError:
        raise InputError(f"--prompt-ids must be space-separated whole numbers (token ids); got {prompt_ids!r}") from None
    with _connect(user, url, developer_key, ca, server_name, client_cert, client_key) as client:
        ids = prompt or [int(client.meta.get("bos_token_id") or 0)]
        eos = client.meta.get("eos_token_id") if stop_at_eos else None
        t0 = time.perf_counter()
        out = client.generate(ids, max_new_tokens, eos_token_id=eos)
        dt = time.perf_counter() - t0
    console.print(" ".join(str(t) for t in out))
    console.print(f"[dim]{len(out)} tokens in {dt:.2f} s ({1000 * dt / max(len(out), 1):.1f} ms/token)[/dim]")


@app.command()
@_clear_errors
def encode(
    user: Path = typer.Option(..., help="user key bundle"),
    url: str = typer.Option("http://127.0.0.1:8470", help="the cloud's address (https://... with --ca)"),
    text: list[str] = typer.Option(..., help="sentence to embed (repeat for a batch)"),
    pair: list[str] = typer.Option([], help="second sentence of a pair, one per --text (BERT segment B)"),
    out: Path | None = typer.Option(None, help="write the full vectors: .npy (float32, one row per text) "
                                               "or .json (list of lists)"),
    normalize: bool | None = typer.Option(None, "--normalize/--no-normalize",
                                          help="L2-normalise the vectors (default: as the model's sentence-transformers "
                                               "configuration says; yes without one)"),
    developer_key: str | None = _DEV_KEY,
    ca: Path | None = _CA,
    server_name: str | None = _SERVER_NAME,
    client_cert: Path | None = _CLIENT_CERT,
    client_key: Path | None = _CLIENT_KEY,
) -> None:
    """Sentence embeddings from an encoder through the cloud, truncated, pooled and normalised as the
    model's sentence-transformers configuration says (else: the model's positions, mean pooling)."""
    from veil.errors import InputError
    from veil.permute.errors import KeyBundleError

    if pair and len(pair) != len(text):
        raise InputError(f"--pair given {len(pair)} times for {len(text)} --text; give one per --text or none")
    if out is not None and out.suffix not in (".npy", ".json"):
        raise InputError(f"--out must end in .npy or .json; got {out.name!r}")
    with _connect(user, url, developer_key, ca, server_name, client_cert, client_key) as client:
        tok_json = client.bundle.tokenizer_files.get("tokenizer.json")
        if tok_json is None:
            raise KeyBundleError("the user bundle has no tokenizer.json; cannot tokenise text")
        settings = client.sentence_config
        if settings.get("do_lower_case"):
            text, pair = [t.lower() for t in text], [p.lower() for p in pair]
        ids, mask, types, cut = _tokenise(tok_json.decode(), text, pair, client.max_text_tokens)
        for i in cut:
            err_console.print(f"[dim]text {i + 1} truncated to {client.max_text_tokens} tokens (the model's limit, "
                              "as sentence-transformers does)[/dim]")
        emb = client.sentence_embedding(ids, mask, types if pair else None)
        if normalize is None:
            normalize = bool(settings.get("normalize", True))
    if normalize:
        emb = emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".npy":
            np.save(out, emb.astype(np.float32))
        else:
            import json

            out.write_text(json.dumps(emb.astype(float).tolist()))
    for row in emb:
        console.print(np.array2string(row[:8], precision=4) + f" ... ({row.shape[0]} dims"
                      f"{', L2-normalised' if normalize else ''})")
    if out is not None:
        console.print(f"[dim]{emb.shape[0]} vectors of {emb.shape[1]} written to {out}[/dim]")


def _tokenise(tok_json: str, texts: list[str], pairs: list[str], max_len: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Token ids, attention mask and token-type ids, padded to the longest text (not to a fixed
    length: padding is masked out anyway, and the tokenizer's own fixed padding is switched off),
    and the indices of the texts cut at ``max_len`` tokens."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tok_json)
    pad_id = (tok.padding or {}).get("pad_id", 0)
    tok.no_padding()
    tok.enable_truncation(max_length=max_len)
    encs = tok.encode_batch(list(zip(texts, pairs, strict=True)) if pairs else texts)
    n = max(len(e.ids) for e in encs)
    ids = np.full((len(encs), n), pad_id, dtype=np.int64)
    mask = np.zeros((len(encs), n), dtype=np.int64)
    types = np.zeros((len(encs), n), dtype=np.int64)
    for i, e in enumerate(encs):
        ids[i, :len(e.ids)], mask[i, :len(e.ids)], types[i, :len(e.ids)] = e.ids, e.attention_mask, e.type_ids
    return ids, mask, types, [i for i, e in enumerate(encs) if e.overflowing]


@app.command()
@_clear_errors
def export(
    cloud: Path = typer.Option(..., help="vocab-mode cloud package directory from `transform`"),
    out: Path = typer.Option(..., help="output: a directory (--format hf) or a .gguf file (--format gguf)"),
    format: str = typer.Option("hf", help="hf: Hugging Face directory (transformers, vLLM); gguf: llama.cpp"),
    key: Path | None = typer.Option(None, help="developer key: relabel BOS/EOS so engines stop correctly"),
    developer_key: str | None = typer.Option(None, help="require the developer's signature on the package"),
) -> None:
    """Write the transformed model as a standard checkpoint for existing serving engines."""
    from veil.errors import InputError
    from veil.permute.bundle import read_cloud_package, read_key
    from veil.permute.engines import export_gguf, export_hf

    package = read_cloud_package(cloud, developer_key)
    sigma_inv = None
    if key is not None:
        pkey, _ = read_key(key)
        sigma_inv = pkey.vocab_inverse
    if format == "hf":
        export_hf(package, out, sigma_inv)
    elif format == "gguf":
        export_gguf(package, out, sigma_inv)
    else:
        raise InputError(f"unknown --format {format!r}; expected hf or gguf")
    console.print(f"{format} checkpoint written to {out}; the cloud takes and returns relabelled token ids "
                  "(map them with the user bundle: veil.permute.engines.VocabMap)")


def _corpus_ids(model: Path, corpus: Path) -> tuple[np.ndarray, np.ndarray]:
    from veil.errors import InputError

    tok_path = model / "tokenizer.json"
    if not tok_path.is_file():
        raise InputError(f"--corpus needs {tok_path} to tokenise the text")
    try:
        text = corpus.read_text(errors="replace")
    except OSError as exc:
        raise InputError(f"cannot read corpus {corpus}: {exc.strerror or exc}") from None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    tok.no_truncation()
    tok.no_padding()
    ids = np.array(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    if ids.size < 20:
        raise InputError(f"corpus {corpus} gives only {ids.size} tokens; need at least 20")
    half = ids.size // 2
    return ids[:half][None, :], ids[half:2 * half][None, :]


@app.command()
@_clear_errors
def audit(
    model: Path = typer.Option(..., help="the original model (plays the public base model)"),
    key: Path = typer.Option(..., help="developer key directory (used only to score the attacks)"),
    noise: str = typer.Option("0,0.1,1", help="simulated fine-tuning noise levels, in std units"),
    sequences: int = typer.Option(32, help="sampled sequences of traffic (decoders)"),
    length: int = typer.Option(64, help="tokens per sampled sequence"),
    corpus: Path | None = typer.Option(None, help="text file for traffic (encoders; needs tokenizer.json "
                                                  "in the model directory): first half is the user's traffic, "
                                                  "second half the attacker's reference"),
) -> None:
    """Run the attacks a reviewer would run and print how much of the secrets they recover."""
    from veil.permute.audit import run_audit
    from veil.permute.bundle import read_key
    from veil.permute.models import load_source

    pkey, meta = read_key(key)
    source = load_source(model)
    noises = tuple(float(x) for x in noise.split(",") if x.strip())
    traffic = reference = None
    if corpus is not None:
        traffic, reference = _corpus_ids(model, corpus)
    results = run_audit(source, pkey, noises=noises, n_seq=sequences, length=length, traffic=traffic,
                        reference=reference)
    table = Table(title=f"permute leakage audit: {meta['family']}, key mode {meta['mode']}")
    for col in ("attack", "attacker knows", "recovered", "of what"):
        table.add_column(col)
    for r in results:
        table.add_row(r.attack, r.attacker_knows, f"{100 * r.recovered:.1f}%", r.detail)
    Console(width=max(console.width, 120)).print(table)
    console.print("[yellow]permute mode is obfuscation, not cryptography; hidden states can also be inverted "
                  "(Hidden No More, arXiv 2505.18332). See docs/permute.md.[/yellow]")
