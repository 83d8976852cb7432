"""The `kubetune` command: validate manifests, print the CRD, run a job locally, run the operator.

The CLI sits on top of the three packages and imports the trainer and the operator lazily, so
`kubetune validate` and `kubetune crd` work with the base install (no torch, no cluster client).
"""

from __future__ import annotations

import sys

import click
from kubetune.api.manifest import ManifestError, iter_jobs


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kubetune")
def main() -> None:
    """kubetune: fine-tune language models on Kubernetes, or locally with `kubetune run`."""


@main.command()
@click.option(
    "--markdown",
    is_flag=True,
    help="Print the API reference in Markdown instead (what docs/api.md holds): every field with its type, default, description and validation.",
)
def crd(markdown: bool) -> None:
    """Print the FineTuneJob CustomResourceDefinition (what crds/ holds)."""
    if markdown:
        from kubetune.api.reference import markdown as reference

        click.echo(reference(), nl=False)
        return
    from kubetune.api.crd import crd_yaml

    click.echo(crd_yaml(), nl=False)


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-q", "--quiet", is_flag=True, help="Print problems only.")
@click.option(
    "--data",
    "check_data",
    is_flag=True,
    help="Also check each job's dataset files, as the cluster's validation Job does (one streaming pass; no model is loaded).",
)
@click.option(
    "--tokens",
    is_flag=True,
    help="With --data: also tokenise every example with the model's tokenizer for token statistics (slower; only tokenizer files are fetched, and code shipped with a model is never run).",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, writable=True),
    help="With --data: write the dataset report (data-report.json: counts, duplicates, train/validation overlap, PII findings, estimates) here; with several jobs, one JSON object per job name.",
)
def validate(files: tuple[str, ...], quiet: bool, check_data: bool, tokens: bool, report_path: str | None) -> None:
    """Validate FineTuneJob manifests (multi-document YAML allowed).

    Each problem is printed as FILE[#doc]: spec.path: message. Exit 0 when every manifest is
    valid, 1 otherwise. With --data the datasets are read and checked as the trainer would
    (FILE:LINE: problem).
    """
    failed = False
    reports: dict[str, object] = {}
    for path in files:
        try:
            found = 0
            for doc, job, problems in iter_jobs([path]):
                found += 1
                if problems:
                    failed = True
                    for problem in problems:
                        click.echo(f"{doc.where}: {problem}")
                elif job is not None:
                    if not quiet:
                        click.echo(f"{doc.where}: ok (FineTuneJob {job.metadata.name}, {job.spec.method.adaptation})")
                    if check_data and not _validate_data(job, tokens, reports):
                        failed = True
            if found == 0:
                failed = True
                click.echo(f"{path}: no FineTuneJob found (apiVersion kubetune.io/v1alpha1, kind FineTuneJob)")
        except ManifestError as err:
            failed = True
            click.echo(str(err))
    if report_path and reports:
        import json

        only = next(iter(reports.values())) if len(reports) == 1 else reports
        with open(report_path, "w", encoding="utf-8") as f:
            json.dump(only, f, indent=1)
        click.echo(f"dataset report: {report_path}")
    sys.exit(1 if failed else 0)


def _validate_data(job: object, tokens: bool, reports: dict[str, object] | None = None) -> bool:
    try:
        from kubetune.trainer import data
    except ImportError as err:
        click.echo(f"  --data needs the trainer's libraries ({err.name} is missing): pip install 'kubetune[trainer]'")
        return False
    spec = job.spec  # type: ignore[attr-defined]
    try:
        report = data.check(
            spec.dataset, extra_keys=data.extra_keys_for(spec), record_check=data.record_check_for(spec)
        )
    except data.DataError as err:
        click.echo(str(err))
        return False
    for line in report.summary_lines():
        click.echo(f"  {line}")
    from kubetune.trainer import sources

    if (missing := sources.missing_local_model(spec)) is not None:
        click.echo(f"  {missing}")
        return False
    if (too_long := sources.context_problem_for(spec, fetch=tokens)) is not None:  # before any weight is fetched
        click.echo(f"  {too_long}")
        return False
    tokenizer = None
    if tokens:
        try:
            tokenizer = sources.load_tokenizer(spec.model)
        except sources.ModelSourceError as err:
            click.echo(f"  (no token statistics: {err})")
        if tokenizer is not None:
            try:
                report = data.validate(
                    spec.dataset,
                    tokenizer=tokenizer,
                    extra_keys=data.extra_keys_for(spec),
                    record_check=data.record_check_for(spec),
                )
            except data.DataError as err:
                click.echo(str(err))
                return False
            for line in report.summary_lines()[1:]:
                click.echo(f"  {line}")
    return _data_report(job, tokenizer, reports)


def _data_report(job: object, tokenizer: object, reports: dict[str, object] | None) -> bool:
    """The dataset report (as the validation Job builds it) and spec.dataset.pii: False under refuse with findings."""
    from kubetune.trainer import data, datareport

    spec = job.spec  # type: ignore[attr-defined]
    report = datareport.stream(spec, tokenizer=tokenizer)
    if reports is not None:
        reports[job.metadata.name] = report  # type: ignore[attr-defined]
    for line in datareport.summary_lines(report):
        click.echo(f"  {line}")
    try:
        warnings = datareport.check_policy(report)
    except data.DataError as err:
        click.echo(str(err))
        return False
    for line in datareport.finding_lines(report):
        click.echo(f"  {line}")
    for warning in warnings:
        click.echo(f"  warning: {warning}")
    return True


@main.command()
@click.argument("uri")
def verify(uri: str) -> None:
    """Verify an output (adapter + manifest.json) or a checkpoint: every file's size and sha256."""
    from kubetune.trainer import storage

    if "://" not in uri:
        from pathlib import Path

        uri = Path(uri).resolve().as_uri()
    ok, reason = storage.verify(storage.Store(uri), "")
    if not ok:
        click.echo(f"{uri}: NOT verified: {reason}")
        sys.exit(1)
    import hashlib
    import json

    store = storage.Store(uri)
    manifest = json.loads(store.read_bytes("manifest.json"))
    click.echo(f"{uri}: verified {len(manifest['files'])} files (sha256 and size match manifest.json)")
    merged = manifest.get("merged")
    if isinstance(merged, dict) and merged.get("prefix"):
        # The merged copy for serving (spec.serving): its own manifest, whose digest the result's records.
        prefix = str(merged["prefix"])
        ok, reason = storage.verify(store, prefix)
        if ok and hashlib.sha256(store.read_bytes(f"{prefix}/manifest.json")).hexdigest() != merged.get("sha256"):
            ok, reason = False, f"{prefix}/manifest.json differs from the digest manifest.json records"
        if not ok:
            click.echo(f"{uri}/{prefix}: NOT verified: {reason}")
            sys.exit(1)
        count = len(storage.read_manifest(store, prefix)["files"])
        click.echo(
            f"{uri}/{prefix}: verified {count} files of the merged model (sha256 and size match {prefix}/manifest.json)"
        )


@main.command("report")
@click.argument("output")
@click.option(
    "-o",
    "--out",
    "dest",
    type=click.Path(dir_okay=False, writable=True),
    help="Write the page here (default: OUTPUT's report.html for a local output, else ./<name>-report.html).",
)
@click.option(
    "--render",
    is_flag=True,
    help="Render the page again from report-data.json with this kubetune (instead of copying report.html).",
)
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default browser.")
def report_cmd(output: str, dest: str | None, render: bool, open_browser: bool) -> None:
    """Write or open the run's report.html (OUTPUT: the job's output directory or URL).

    The page is self-contained (plots embedded, nothing fetched): loss and eval-loss curves, the
    learning-rate schedule, throughput, base vs tuned metrics, the samples side by side, the
    dataset report, cost and energy. Prints the page's local path.
    """
    import json
    from pathlib import Path

    try:
        from kubetune.trainer import storage
        from kubetune.trainer.report import DATA_FILE, REPORT_FILE
    except ImportError as err:
        click.echo(
            f"kubetune report needs the trainer's libraries ({err.name} is missing): pip install 'kubetune[trainer]'",
            err=True,
        )
        sys.exit(1)
    local = "://" not in output or output.startswith("file://")
    uri = output if "://" in output else Path(output).resolve().as_uri()
    store = storage.Store(uri)
    try:
        if render or not store.exists(REPORT_FILE):
            from kubetune.trainer.report import render as render_page

            page = render_page(json.loads(store.read_bytes(DATA_FILE))).encode()
        else:
            page = store.read_bytes(REPORT_FILE)
    except (storage.StorageError, FileNotFoundError, ValueError) as err:
        click.echo(
            f"error: {output} holds no report ({REPORT_FILE} or {DATA_FILE}): {err}; is it a finished job's output?",
            err=True,
        )
        sys.exit(1)
    if dest is None:
        if local and not render:
            dest = str(Path(storage.Store(uri).uri_for(REPORT_FILE).removeprefix("file://")))
        else:
            dest = f"{uri.rstrip('/').rsplit('/', 1)[-1] or 'kubetune'}-report.html"
    target = Path(dest)
    if not (target.exists() and target.read_bytes() == page):
        target.write_bytes(page)
    click.echo(str(target.resolve()))
    if open_browser:
        import webbrowser

        webbrowser.open(target.resolve().as_uri())


@main.command("run")
@click.argument("manifest", type=click.Path(dir_okay=False, exists=True))
@click.option("--output", help="Output URI (default: file://./kubetune-output/<name>/).")
@click.option(
    "--metrics-port",
    type=int,
    default=-1,
    show_default=True,
    help="Serve Prometheus metrics on this port (0: any free port, -1: off).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace a finished result at the output (spec.output.overwrite: true); without it a finished output is reported, not retrained.",
)
def run_cmd(manifest: str, output: str | None, metrics_port: int, overwrite: bool) -> None:
    """Run a FineTuneJob locally: the same trainer as in the pod, with a progress bar."""
    from kubetune.api.manifest import ManifestError, load_job

    try:
        job = load_job(manifest)
    except ManifestError as err:
        click.echo(str(err), err=True)
        sys.exit(1)
    if overwrite:
        job.spec.output.overwrite = True
    from kubetune.localrun import run_locally

    sys.exit(run_locally(job, output, metrics_port))


_LOCAL_ONLY = (
    "Generation is transformers' generate, one request at a time: right for the demo model and small "
    "models on a laptop. Production serving belongs to vLLM or KServe (spec.serving)."
)


def _open_pool(outputs: tuple[str, ...], device: str) -> object:
    """Verify and load outputs for chat/serve; a clear message and exit 1 instead of a traceback."""
    try:
        from kubetune.trainer import quiet

        quiet.install()  # before the ML libraries are imported (bitsandbytes logs at import)
        from kubetune.trainer import inference, storage
        from transformers.utils import logging as hf_logging
    except ImportError as err:
        click.echo(
            f"this command needs the trainer's libraries ({err.name} is missing): pip install 'kubetune[trainer]'",
            err=True,
        )
        sys.exit(1)
    hf_logging.disable_progress_bar()  # the answers go to the terminal; no "Loading weights" bars
    try:
        opened = [inference.open_output(o) for o in outputs]
        for o in opened:
            click.echo(f"loading {inference.model_id(o)} ({o.kind} on {o.base}) from {o.uri}", err=True)
        return inference.ModelPool(opened, device=device)
    except (inference.OutputError, storage.StorageError) as err:  # ModelSourceError is a StorageError
        click.echo(f"error: {err}", err=True)
        sys.exit(1)


@main.command("chat", epilog=_LOCAL_ONLY)
@click.argument("output")
@click.option("-p", "--prompt", help="Ask once, print the answer and exit (default: an interactive chat).")
@click.option("-s", "--system", help="A system message put before the conversation.")
@click.option(
    "--max-tokens", type=click.IntRange(min=1), default=256, show_default=True, help="Most new tokens per answer."
)
@click.option("--temperature", type=click.FloatRange(0, 2), default=0.7, show_default=True, help="0 answers greedily.")
@click.option(
    "--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True, help="Nucleus sampling mass."
)
@click.option("--seed", type=int, help="Seed the sampler for repeatable answers.")
@click.option(
    "--compare",
    is_flag=True,
    help="Also answer with the base model (the adapter disabled, or manifest baseModel for merged outputs).",
)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, … (auto: cuda when available).")
def chat_cmd(
    output: str,
    prompt: str | None,
    system: str | None,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    compare: bool,
    device: str,
) -> None:
    """Chat with a finished output (OUTPUT: its directory or URL, the one holding manifest.json).

    The output is verified against its manifest.json before anything loads, and the chat template
    saved with its tokenizer renders the conversation. In the interactive chat, /reset forgets the
    conversation and /exit (or Ctrl-D) leaves.
    """
    pool = _open_pool((output,), device)
    from kubetune.trainer.inference import OutputError, RequestError

    tuned = next(m for m in pool.models.values() if m.output is not None)  # type: ignore[attr-defined]
    try:
        models = [tuned, pool.base_of(tuned)] if compare else [tuned]  # type: ignore[attr-defined]
    except Exception as err:
        click.echo(f"error: --compare needs the base model {tuned.output.base}: {err}", err=True)
        sys.exit(1)
    start = [{"role": "system", "content": system}] if system else []
    histories = {m.id: list(start) for m in models}
    params = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}

    def answer(message: str) -> None:
        for m in models:
            if compare:
                click.echo(f"[{'tuned' if m is tuned else 'base'}: {m.id}]")
            histories[m.id].append({"role": "user", "content": message})
            try:
                stream = pool.stream(m, pool.chat_ids(m, histories[m.id]), **params)  # type: ignore[attr-defined]
                for piece in stream:
                    click.echo(piece, nl=False)
            except (RequestError, OutputError) as err:
                click.echo(f"\nerror: {err}", err=True)
                histories[m.id].pop()
                continue
            click.echo("")
            histories[m.id].append({"role": "assistant", "content": stream.text})

    if prompt is not None:
        answer(prompt)
        return
    click.echo(f"chatting with {tuned.id}; /reset forgets the conversation, /exit leaves", err=True)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            click.echo("")
            return
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            histories = {m.id: list(start) for m in models}
            click.echo("(conversation forgotten)", err=True)
        elif line.strip():
            answer(line)


@main.command("serve", epilog=_LOCAL_ONLY)
@click.argument("outputs", nargs=-1, required=True)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0: every interface; there is no authentication).",
)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, … (auto: cuda when available).")
def serve_cmd(outputs: tuple[str, ...], host: str, port: int, device: str) -> None:
    """Serve finished outputs with an OpenAI-compatible API (/v1/models, /v1/chat/completions,
    /v1/completions).

    Each output is listed as ft:<base>:<name>, its base as <base>. Adapters trained on the same base
    share one copy of the base weights.
    """
    try:
        from kubetune.trainer import server
    except ImportError as err:
        click.echo(
            f"kubetune serve needs aiohttp and the trainer's libraries ({err.name} is missing): "
            "pip install 'kubetune[trainer]'",
            err=True,
        )
        sys.exit(1)
    pool = _open_pool(outputs, device)
    try:
        server.serve(pool, host=host, port=port, print_fn=lambda msg: click.echo(msg, err=True))  # type: ignore[arg-type]
    except OSError as err:
        click.echo(f"error: cannot listen on {host}:{port}: {err.strerror or err}; choose another --port", err=True)
        sys.exit(1)


@main.command("api")
@click.option(
    "--local/--cluster",
    "local",
    default=True,
    show_default=True,
    help="--local (the embedded default): files and jobs on this machine, jobs run by the trainer in a worker process. --cluster: uploads in object storage and jobs as FineTuneJobs, configured by KUBETUNE_API_* variables (kubetune.gateway.server).",
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    default="kubetune-api",
    show_default=True,
    help="Where --local keeps files, jobs, outputs and its state (it survives restarts).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to listen on.")
@click.option(
    "--keys",
    "keys_file",
    type=click.Path(dir_okay=False, exists=True),
    help="--local: an access file of API keys, each with its namespace (kubetune.gateway.auth); without it every caller is the one local tenant.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="--local: jobs trained at the same time.",
)
def api_cmd(local: bool, directory: str, host: str, port: int, keys_file: str | None, workers: int) -> None:
    """Serve OpenAI's fine-tuning API (files, fine_tuning.jobs, models) under /v1.

    Point the openai client at it: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=KEY).
    """
    try:
        import uvicorn
        from kubetune.gateway import metrics
        from kubetune.gateway.app import create_app
        from kubetune.gateway.auth import AccessFile, AccessFileError, Authenticator, RequestMethodMiddleware
        from kubetune.gateway.backend import Tenant
        from kubetune.gateway.local import LocalBackend
    except ImportError as err:
        click.echo(
            f"kubetune api needs its libraries ({err.name} is missing): pip install 'kubetune[gateway]'", err=True
        )
        sys.exit(1)
    if not local:
        from kubetune.gateway.server import ConfigError, kube_app

        try:
            app = kube_app()
        except ConfigError as err:
            click.echo(f"kubetune api --cluster: {err}", err=True)
            sys.exit(2)
        click.echo(f"kubetune api (cluster): http://{host}:{port}/v1 (OpenAPI: /openapi.json)", err=True)
        uvicorn.run(app, host=host, port=port, log_level="warning")
        return
    if keys_file:
        try:
            access = AccessFile(keys_file)
            _ = access.config  # read now: a broken file is reported before serving
        except AccessFileError as err:
            click.echo(str(err), err=True)
            sys.exit(1)
        authenticator = Authenticator(access)
    else:
        authenticator = Authenticator(
            anonymous=Tenant(namespace="default", organization_id="org-local", key_id="local")
        )
    app = create_app(LocalBackend(directory, max_workers=workers), authenticator)
    metrics.install(app)  # /metrics: requests by route and status, latency (as --cluster has)
    app.add_middleware(RequestMethodMiddleware)
    click.echo(f"kubetune api: http://{host}:{port}/v1 (OpenAPI: /openapi.json), data in {directory}", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


@main.command("operator")
@click.option(
    "-n",
    "--namespace",
    "namespaces",
    multiple=True,
    help="Watch this namespace (repeatable). Default: KUBETUNE_NAMESPACES, else the whole cluster.",
)
@click.option("-A", "--all-namespaces", is_flag=True, help="Watch the whole cluster.")
@click.option(
    "--peering/--standalone", default=None, help="kopf peering for a standby replica (default: KUBETUNE_PEERING)."
)
def operator_cmd(namespaces: tuple[str, ...], all_namespaces: bool, peering: bool | None) -> None:
    """Run the kubetune operator (needs the [operator] extra and cluster access)."""
    if namespaces and all_namespaces:
        raise click.UsageError("use --namespace or --all-namespaces, not both")
    from kubetune.operator.__main__ import run

    run(namespaces=() if all_namespaces else (namespaces or None), peering=peering)


if __name__ == "__main__":
    main()
