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
def validate(files: tuple[str, ...], quiet: bool) -> None:
    """Validate FineTuneJob manifests (multi-document YAML allowed).

    Each problem is printed as FILE[#doc]: spec.path: message. Exit 0 when every manifest is
    valid, 1 otherwise.
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
                elif not quiet and job is not None:
                    click.echo(f"{doc.where}: ok (FineTuneJob {job.metadata.name}, {job.spec.method.adaptation})")
            if found == 0:
                failed = True
                click.echo(f"{path}: no FineTuneJob found (apiVersion kubetune.io/v1alpha1, kind FineTuneJob)")
        except ManifestError as err:
            failed = True
            click.echo(str(err))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
