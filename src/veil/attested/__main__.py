"""``python -m veil.attested ...``: the same commands as ``veil attested ...``."""

from veil.cli.attested_cmd import main

main()
