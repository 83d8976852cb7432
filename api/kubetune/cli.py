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
def crd() -> None:
    """Print the FineTuneJob CustomResourceDefinition (what crds/ holds)."""
    from kubetune.api.crd import crd_yaml

    click.echo(crd_yaml(), nl=False)


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-q", "--quiet", is_flag=True, help="Print problems only.")
@click.option("--data", "check_data", is_flag=True, help="Also check each job's dataset files, as the cluster's validation Job does (one streaming pass; no model is loaded).")
@click.option("--tokens", is_flag=True, help="With --data: also tokenise every example with the model's tokenizer for token statistics (slower; only tokenizer files are fetched, and code shipped with a model is never run).")
def validate(files: tuple[str, ...], quiet: bool, check_data: bool, tokens: bool) -> None:
    """Validate FineTuneJob manifests (multi-document YAML allowed).

    Each problem is printed as FILE[#doc]: spec.path: message. Exit 0 when every manifest is
    valid, 1 otherwise. With --data the datasets are read and checked as the trainer would
    (FILE:LINE: problem).
    """
    failed = False
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
                    if check_data and not _validate_data(job, tokens):
                        failed = True
            if found == 0:
                failed = True
                click.echo(f"{path}: no FineTuneJob found (apiVersion kubetune.io/v1alpha1, kind FineTuneJob)")
        except ManifestError as err:
            failed = True
            click.echo(str(err))
    sys.exit(1 if failed else 0)


def _validate_data(job: object, tokens: bool) -> bool:
    try:
        from kubetune.trainer import data
    except ImportError as err:
        click.echo(f"  --data needs the trainer's libraries ({err.name} is missing): pip install 'kubetune[trainer]'")
        return False
    spec = job.spec  # type: ignore[attr-defined]
    try:
        report = data.check(spec.dataset, extra_keys=data.extra_keys_for(spec))
    except data.DataError as err:
        click.echo(str(err))
        return False
    for line in report.summary_lines():
        click.echo(f"  {line}")
    if not tokens:
        return True
    from kubetune.trainer import sources

    try:
        tokenizer = sources.load_tokenizer(spec.model)
    except sources.ModelSourceError as err:
        click.echo(f"  (no token statistics: {err})")
        return True
    try:
        report = data.validate(spec.dataset, tokenizer=tokenizer, extra_keys=data.extra_keys_for(spec))
    except data.DataError as err:
        click.echo(str(err))
        return False
    for line in report.summary_lines()[1:]:
        click.echo(f"  {line}")
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
    import json

    files = json.loads(storage.Store(uri).read_bytes("manifest.json"))["files"]
    click.echo(f"{uri}: verified {len(files)} files (sha256 and size match manifest.json)")


@main.command("run")
@click.argument("manifest", type=click.Path(dir_okay=False, exists=True))
@click.option("--output", help="Output URI (default: file://./kubetune-output/<name>/).")
@click.option("--metrics-port", type=int, default=-1, show_default=True, help="Serve Prometheus metrics on this port (0: any free port, -1: off).")
def run_cmd(manifest: str, output: str | None, metrics_port: int) -> None:
    """Run a FineTuneJob locally: the same trainer as in the pod, with a progress bar."""
    from kubetune.api.manifest import ManifestError, load_job

    try:
        job = load_job(manifest)
    except ManifestError as err:
        click.echo(str(err), err=True)
        sys.exit(1)
    from kubetune.localrun import run_locally

    sys.exit(run_locally(job, output, metrics_port))


@main.command("operator")
@click.option("-n", "--namespace", "namespaces", multiple=True, help="Watch this namespace (repeatable). Default: KUBETUNE_NAMESPACES, else the whole cluster.")
@click.option("-A", "--all-namespaces", is_flag=True, help="Watch the whole cluster.")
@click.option("--peering/--standalone", default=None, help="kopf peering for a standby replica (default: KUBETUNE_PEERING).")
def operator_cmd(namespaces: tuple[str, ...], all_namespaces: bool, peering: bool | None) -> None:
    """Run the kubetune operator (needs the [operator] extra and cluster access)."""
    if namespaces and all_namespaces:
        raise click.UsageError("use --namespace or --all-namespaces, not both")
    from kubetune.operator.__main__ import run

    run(namespaces=() if all_namespaces else (namespaces or None), peering=peering)


if __name__ == "__main__":
    main()
