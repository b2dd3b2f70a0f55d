#!/usr/bin/env python
"""Print the folder of the demo's photos (cats_and_dogs_filtered), downloading it once if needed."""

import click

from pyimagesearch_tl.cli import PTLCommand
from pyimagesearch_tl.demo import resolve_demo_data


@click.command(cls=PTLCommand)
@click.option("--data", help="Use this folder instead of looking for or downloading the demo data.")
def main(data):
    click.echo(resolve_demo_data(data))


if __name__ == "__main__":
    main()
