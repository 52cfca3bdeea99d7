"""Prints pip constraints that pin each `>=` floor in setup.cfg's
install_requires (`keras>=3.15` becomes `keras==3.15`, i.e. 3.15.0), so that
.ci/run tests the oldest versions keras_bn declares, not only the newest."""

import configparser
import pathlib
import re

config = configparser.ConfigParser()
config.read(pathlib.Path(__file__).resolve().parent.parent / "setup.cfg")
for line in config["options"]["install_requires"].split("\n"):
    match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([\d.]+)\s*", line)
    if match:
        print(f"{match.group(1)}=={match.group(2)}")
