"""The Home Assistant add-on (addon/) and the Docker images, checked without Docker.

No Docker engine runs here, so the images are not built; what can be known from the files is:
the run script's command line for given options (run by bash with a stand-in for bashio), the
add-on's config against the Supervisor's documented fields, the base images per architecture,
and the Dockerfiles' independence from the architecture they are built for.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from soprano.audio.effects import MAX_SPEED, MAX_VOLUME, MIN_SPEED
from soprano.audio.pauses import MAX_SILENCE_SECONDS
from soprano.lm.native import DTYPES
from wyoming_soprano.__main__ import build_parser

ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "addon"
SERVICES = ADDON / "rootfs/etc/s6-overlay/s6-rc.d"
RUN_SCRIPT = SERVICES / "soprano/run"

# From the Supervisor's documentation of an add-on's (app's) config.yaml.
REQUIRED_KEYS = {"name": str, "version": str, "slug": str, "description": str, "arch": list}
OPTIONAL_KEYS: dict[str, type | tuple[type, ...]] = {
    "url": str,
    "startup": str,
    "boot": str,
    "init": bool,
    "stage": str,
    "ports": dict,
    "ports_description": dict,
    "host_network": bool,
    "homeassistant": str,
    "map": list,
    "discovery": list,
    "backup_exclude": list,
    "options": dict,
    "schema": (dict, bool),
    "image": str,
    "timeout": int,
    "environment": dict,
    "tmpfs": bool,
    "watchdog": str,
}
ARCHES = {"amd64", "aarch64"}
"""The architectures the Supervisor supports (armhf, armv7 and i386 are deprecated)."""
MAP_TYPES = {
    "data",
    "ssl",
    "local_apps",
    "backup",
    "share",
    "media",
    "homeassistant_config",
    "all_app_configs",
    "app_config",
}
"""Current folder types (`config`, `addons`, `addon_config`, `all_addon_configs` are legacy)."""
SLUG = re.compile(r"^[-_.A-Za-z0-9]+$")
PORT = re.compile(r"^\d+(?:/tcp|/udp)?$")
VERSION = re.compile(r"^\d+(?:\.\d+)*(?:[.-]?\w+)?$")
SCHEMA_ELEMENT = re.compile(
    r"^(?:bool|email|url|port|device(?:\(subsystem=[a-z]+\))?"
    r"|(?P<kind>str|password|int|float)(?:\((?P<low>-?[\d.]*),(?P<high>-?[\d.]*)\))?"
    r"|match\((?P<match>.*)\)|list\((?P<choices>.+)\))(?P<optional>\?)?$"
)
ARCH_NAMES = re.compile(r"x86_64|amd64|aarch64|arm64|armv7|armhf|i386|i686")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return load_yaml(ADDON / "config.yaml")


def check_option(element: str, value: Any) -> None:
    """`value` is valid for the schema `element`, as the Supervisor reads it."""
    match = SCHEMA_ELEMENT.match(element)
    assert match, f"unknown schema element {element!r}"
    kind = match["kind"]
    if element.startswith("bool"):
        assert isinstance(value, bool), (element, value)
    elif match["choices"] is not None:
        assert str(value) in match["choices"].split("|"), (element, value)
    elif match["match"] is not None:
        assert re.match(match["match"], str(value)), (element, value)
    elif kind in ("int", "float"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (element, value)
        if kind == "int":
            assert isinstance(value, int), (element, value)
        if match["low"]:
            assert value >= float(match["low"]), (element, value)
        if match["high"]:
            assert value <= float(match["high"]), (element, value)
    elif kind in ("str", "password"):
        assert isinstance(value, str), (element, value)


def check_keys(config: dict[str, Any]) -> None:
    for key, kind in REQUIRED_KEYS.items():
        assert isinstance(config.get(key), kind), key
    for key, value in config.items():
        if key not in REQUIRED_KEYS:
            assert key in OPTIONAL_KEYS, f"{key} is not a documented config key"
            assert isinstance(value, OPTIONAL_KEYS[key]), key
    assert SLUG.match(config["slug"])
    assert VERSION.match(config["version"])
    assert set(config["arch"]) == ARCHES
    assert config["init"] is False, "the s6-overlay v3 base images need init: false"
    assert config["discovery"] == ["wyoming"]


def check_ports_and_folders(config: dict[str, Any]) -> None:
    for port, host_port in config["ports"].items():
        assert PORT.match(port)
        assert host_port is None or 1 <= host_port <= 65535
    for entry in config["map"]:
        assert isinstance(entry, dict), "map entries in the current form: {type: ...}"
        assert set(entry) <= {"type", "read_only", "path"}
        assert entry["type"] in MAP_TYPES
        assert isinstance(entry.get("read_only", True), bool)


def check_options(config: dict[str, Any]) -> None:
    options, schema = config["options"], config["schema"]
    assert set(options) <= set(schema)
    for key, element in schema.items():
        if isinstance(element, list):
            (item,) = element
            assert isinstance(options.get(key, []), list), key
            for value in options.get(key, []):
                check_option(item, value)
        elif key in options:
            check_option(element, options[key])
        else:
            assert element.endswith("?"), f"{key} has no default and is not optional"


def check_translations(config: dict[str, Any], translations: dict[str, Any]) -> None:
    assert set(translations["configuration"]) == set(config["schema"])
    for key, text in translations["configuration"].items():
        assert isinstance(text.get("name"), str) and text["name"], key
        assert isinstance(text.get("description"), str) and text["description"], key
    assert set(translations["network"]) == set(config["ports"])


def check_config(config: dict[str, Any], translations: dict[str, Any]) -> None:
    """What the Supervisor's documentation asks of an add-on's config.yaml and translations."""
    check_keys(config)
    check_ports_and_folders(config)
    check_options(config)
    check_translations(config, translations)


@pytest.fixture(scope="module")
def translations() -> dict[str, Any]:
    return load_yaml(ADDON / "translations/en.yaml")


def test_the_config_is_valid(config: dict[str, Any], translations: dict[str, Any]) -> None:
    check_config(config, translations)
    assert config["ports"] == {"10200/tcp": None}
    assert config["map"] == [{"type": "share", "read_only": True}]
    assert config["schema"]["dtype"] == f"list({'|'.join(DTYPES)})"
    # The same bounds as the server's.
    assert config["schema"]["speed"] == f"float({MIN_SPEED},{MAX_SPEED})"
    low, high = re.findall(r"[\d.]+", config["schema"]["volume"])
    assert 0 < float(low) <= 1 and float(high) == MAX_VOLUME
    for key in ("sentence_silence", "trailing_silence"):
        assert config["schema"][key] == f"float(0,{MAX_SILENCE_SECONDS:g})"


@pytest.mark.parametrize(
    "change",
    [
        lambda c, t: c.pop("slug"),
        lambda c, t: c["arch"].append("armv7"),
        lambda c, t: c.update(startup_delay=3),
        lambda c, t: c["ports"].update({"10200": 70000}),
        lambda c, t: c["ports"].update({"10200/sctp": None}),
        lambda c, t: c.update(map=["share:rw"]),
        lambda c, t: c.update(map=[{"type": "addon_config"}]),
        lambda c, t: c["options"].update(speed=5.0),
        lambda c, t: c["options"].update(dtype="float16"),
        lambda c, t: c["options"].update(threads=1.5),
        lambda c, t: c["options"].update(debug_logging="yes"),
        lambda c, t: c["schema"].update(pitch="float"),
        lambda c, t: c["schema"].update(speed="number"),
        lambda c, t: t["configuration"].pop("speed"),
        lambda c, t: t["configuration"]["speed"].pop("description"),
        lambda c, t: t["network"].clear(),
    ],
)
def test_the_config_check_finds_mistakes(
    config: dict[str, Any], translations: dict[str, Any], change: Any
) -> None:
    config, translations = copy.deepcopy(config), copy.deepcopy(translations)
    change(config, translations)
    with pytest.raises(AssertionError):
        check_config(config, translations)


def test_build_yaml_has_a_debian_base_for_each_arch(config: dict[str, Any]) -> None:
    build = load_yaml(ADDON / "build.yaml")
    assert set(build["build_from"]) == set(config["arch"])
    default = dockerfile_arg(ADDON / "Dockerfile", "BUILD_FROM")
    repository, tag = default.split(":")
    assert repository == "ghcr.io/home-assistant/base-debian"
    for arch, image in build["build_from"].items():
        assert image == f"ghcr.io/home-assistant/{arch}-base-debian:{tag}"


def test_the_add_on_has_its_files() -> None:
    for name in ("README.md", "DOCS.md", "CHANGELOG.md", "Dockerfile"):
        assert (ADDON / name).read_text().strip(), name
    version = load_yaml(ADDON / "config.yaml")["version"]
    assert f"## {version}" in (ADDON / "CHANGELOG.md").read_text()
    for service, kind in (("soprano", "longrun"), ("discovery", "oneshot")):
        assert (SERVICES / service / "type").read_text().strip() == kind
        assert (SERVICES / "user/contents.d" / service).exists()
    for script in ("soprano/run", "soprano/finish", "discovery/run"):
        text = (SERVICES / script).read_text()
        assert text.startswith("#!/command/with-contenv bashio\n"), script
        assert (SERVICES / script).stat().st_mode & 0o111, f"{script} is not executable"
    assert (SERVICES / "discovery/dependencies.d/soprano").exists()
    discovery = (SERVICES / "discovery/run").read_text()
    assert 'bashio::discovery "wyoming"' in discovery
    assert "wyoming_soprano.health_check" in discovery


# A stand-in for bashio: the functions the scripts call, reading the options from a JSON file
# with jq as bashio does (null gives the default, an array one element per line).
FAKE_BASHIO = r"""
set -o errexit -o errtrace -o nounset -o pipefail
bashio::config() {
    local value
    value="$(jq --raw-output -c -M --arg key "$1" '
        .[$key] as $v
        | if $v == null then null
          elif ($v | type) == "array" then (if $v == [] then empty else $v[] end)
          else $v end' "$OPTIONS_FILE")"
    if [[ "$value" == "null" ]]; then printf '%s' "${2:-null}"; else printf '%s' "$value"; fi
}
bashio::config.has_value() {
    local value
    value="$(bashio::config "$1")"
    [[ "$value" != "null" && -n "$value" ]]
}
bashio::config.true() { [[ "$(bashio::config "$1")" == "true" ]]; }
bashio::log.info() { echo "INFO: $*" >&2; }
bashio::log.error() { echo "ERROR: $*" >&2; }
bashio::var.json() {
    jq -n -c --arg key "$1" --arg value "$2" '{($key): $value}'
}
bashio::discovery() { echo "$1 $2" > "$DISCOVERY_FILE"; }
"""


def run_service_script(
    tmp_path: Path, script: Path, options: dict[str, Any], python3: str
) -> dict[str, str]:
    """Run an s6 service script under bash with the bashio stand-in. `python3` is the body of a
    stand-in for the image's Python, which may write to $RECORD; `sleep` returns at once."""
    options_file = tmp_path / "options.json"
    options_file.write_text(json.dumps(options))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("python3", python3), ("hostname", "echo soprano-app"), ("sleep", ":")):
        stand_in = bin_dir / name
        stand_in.write_text(f"#!/bin/bash\n{body}\n")
        stand_in.chmod(0o755)
    bashio = tmp_path / "bashio.sh"
    bashio.write_text(FAKE_BASHIO)
    files = {"RECORD": str(tmp_path / "record"), "DISCOVERY_FILE": str(tmp_path / "discovery")}
    subprocess.run(
        ["bash", "-c", f"source {shlex.quote(str(bashio))}; source {shlex.quote(str(script))}"],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "OPTIONS_FILE": str(options_file), **files},
        check=True,
        timeout=30,
    )
    return files


def run_script_command(tmp_path: Path, options: dict[str, Any]) -> list[str]:
    """The command line the run script executes for `options` (its `python3` records it)."""
    record = """jq -n '$ARGS.positional' --args -- "$@" > "$RECORD\""""
    files = run_service_script(tmp_path, RUN_SCRIPT, options, record)
    return json.loads(Path(files["RECORD"]).read_text())


def test_discovery_waits_for_the_server_then_reports_its_uri(
    tmp_path: Path, config: dict[str, Any]
) -> None:
    """The health check fails twice (the server still loading), then Home Assistant is told."""
    answers = tmp_path / "health"
    answers.write_text("1\n1\n0\n")
    python3 = (
        f'echo "$*" >> "$RECORD"; code="$(head -n 1 {answers})"; sed -i 1d {answers}; exit "$code"'
    )
    files = run_service_script(tmp_path, SERVICES / "discovery/run", config["options"], python3)
    calls = Path(files["RECORD"]).read_text().splitlines()
    assert calls == ["-m wyoming_soprano.health_check --uri tcp://127.0.0.1:10200 --timeout 5"] * 3
    service, payload = Path(files["DISCOVERY_FILE"]).read_text().split(" ", 1)
    assert service == "wyoming"
    assert json.loads(payload) == {"uri": "tcp://soprano-app:10200"}


FIXED = [
    "-m",
    "wyoming_soprano",
    "--uri",
    "tcp://0.0.0.0:10200",
    "--zeroconf",
    "--data-dir",
    "/data",
    "--data-dir",
    "/share/soprano",
    "--download-dir",
    "/data",
]


NUMBER_FLAGS = {"--speed", "--volume", "--sentence-silence", "--trailing-silence"}


def numbers_read(argv: list[str]) -> list[str | float]:
    """The values of number flags as numbers: jq 1.6 prints 1.0 as `1`, jq 1.7 as `1.0`."""
    return [
        float(value) if flag in NUMBER_FLAGS else value
        for flag, value in zip(["", *argv], argv, strict=False)
    ]


def test_default_options_give_the_default_command(tmp_path: Path, config: dict[str, Any]) -> None:
    argv = run_script_command(tmp_path, config["options"])
    assert numbers_read(argv) == [
        *FIXED,
        "--speed",
        1.0,
        "--volume",
        1.0,
        "--sentence-silence",
        0.0,
        "--trailing-silence",
        0.0,
        "--dtype",
        "float32",
    ]


def test_every_option_reaches_the_command_line(tmp_path: Path, config: dict[str, Any]) -> None:
    options = {
        "voices": [
            "lessac=ekwek/Soprano-1.1-80M",
            "mine=/share/soprano/my voice,language=en_GB",
        ],
        "default_voice": "mine",
        "speed": 1.25,
        "volume": 0.75,
        "sentence_silence": 0.3,
        "trailing_silence": 0.5,
        "dtype": "bfloat16",
        "threads": 2,
        "debug_logging": True,
    }
    argv = run_script_command(tmp_path, options)
    assert argv == [
        *FIXED,
        "--speed",
        "1.25",
        "--volume",
        "0.75",
        "--sentence-silence",
        "0.3",
        "--trailing-silence",
        "0.5",
        "--dtype",
        "bfloat16",
        "--voice",
        "lessac=ekwek/Soprano-1.1-80M",
        "--voice",
        "mine=/share/soprano/my voice,language=en_GB",
        "--default-voice",
        "mine",
        "--threads",
        "2",
        "--debug",
    ]
    for key in config["schema"]:
        assert key in options, f"the test gives every option; {key} is missing"


def test_unset_optional_options_are_left_out(tmp_path: Path, config: dict[str, Any]) -> None:
    options = {**config["options"], "default_voice": "", "voices": []}
    argv = run_script_command(tmp_path, options)
    assert "--default-voice" not in argv
    assert "--voice" not in argv
    assert "--threads" not in argv


def test_the_server_accepts_the_command_line(tmp_path: Path) -> None:
    options = {
        "voices": ["one=/data/one", "two=/data/two,language=en_GB"],
        "default_voice": "two",
        "speed": 0.5,
        "volume": 2.5,
        "sentence_silence": 0.25,
        "trailing_silence": 1.0,
        "dtype": "int8",
        "threads": 1,
        "debug_logging": True,
    }
    argv = run_script_command(tmp_path, options)
    assert argv[:2] == ["-m", "wyoming_soprano"]
    args = build_parser().parse_args(argv[2:])
    assert args.speed == 0.5 and args.volume == 2.5
    assert args.sentence_silence == 0.25 and args.trailing_silence == 1.0
    assert args.dtype == "int8" and args.threads == 1 and args.debug
    assert args.data_dir == ["/data", "/share/soprano"] and args.download_dir == "/data"


# Dockerfiles: what `docker buildx build --platform linux/amd64,linux/arm64` needs from them.


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical: list[str] = []
    current = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            logical.append(current)
            current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def dockerfile_arg(path: Path, name: str) -> str:
    for instruction, arguments in instructions(path):
        if instruction == "ARG" and arguments.startswith(f"{name}="):
            return arguments.split("=", 1)[1].strip('"')
    raise AssertionError(f"{path} has no ARG {name}=...")


@pytest.mark.parametrize("dockerfile", [ROOT / "Dockerfile", ADDON / "Dockerfile"])
def test_dockerfiles_build_for_either_architecture(dockerfile: Path) -> None:
    steps = instructions(dockerfile)
    for instruction, arguments in steps:
        if instruction != "ARG":  # ARG defaults name images and indexes, checked below
            assert not ARCH_NAMES.search(arguments), f"{instruction} {arguments}"
        assert not re.search(r"\b(curl|wget)\b", arguments), "downloads outside pip"
        assert "soprano.cpu.kernels" not in arguments, "kernels are built at the first start"
    froms = [arguments for instruction, arguments in steps if instruction == "FROM"]
    assert len(froms) == 1
    if dockerfile.parent == ADDON:
        assert froms == ["${BUILD_FROM}"]
        assert steps[0] == ("ARG", "BUILD_FROM=" + dockerfile_arg(dockerfile, "BUILD_FROM"))
    assert not ARCH_NAMES.search(froms[0]) and "{arch}" not in froms[0]
    index = dockerfile_arg(dockerfile, "TORCH_INDEX")
    assert index.endswith("/whl/cpu"), "CPU wheels on both architectures"
    assert any(
        "--index-url" in arguments and "${TORCH_INDEX}" in arguments
        for instruction, arguments in steps
        if instruction == "RUN"
    )
    healthchecks = [arguments for instruction, arguments in steps if instruction == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "wyoming_soprano.health_check" in healthchecks[0]
    run = " ".join(arguments for instruction, arguments in steps if instruction == "RUN")
    assert "g++" in run


def test_one_torch_version_everywhere() -> None:
    """The images take torch from PyTorch's CPU index for both architectures, so they pin what
    script/setup installs on x86 (on ARM, setup falls back to PyPI's last CPU-only wheel)."""
    requirement = (ROOT / "script/torch-requirement").read_text()
    (pinned,) = re.findall(r'^  \*\) echo "torch==([\d.]+)"', requirement, re.M)
    for dockerfile in (ROOT / "Dockerfile", ADDON / "Dockerfile"):
        assert dockerfile_arg(dockerfile, "TORCH_VERSION") == pinned, dockerfile


def test_the_image_installs_zeroconf_and_copies_only_what_it_may() -> None:
    steps = instructions(ROOT / "Dockerfile")
    assert any('".[wyoming]"' in arguments for instruction, arguments in steps)
    extras = re.search(r"^wyoming =\n((?:    .+\n)+)", (ROOT / "setup.cfg").read_text(), re.M)
    assert extras and "zeroconf" in extras[1], "--zeroconf needs python-zeroconf in the image"
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignored if line.startswith("!")}
    for instruction, arguments in steps:
        if instruction == "COPY":
            *sources, _ = arguments.split()
            for source in sources:
                assert source.rstrip("/") in allowed, f"{source} is not in the build context"
    entry = (ROOT / "docker_run.sh").read_text()
    assert "--uri 'tcp://0.0.0.0:10200'" in entry and '"$@"' in entry


def test_the_add_on_image_installs_the_project_from_a_wheel_or_pypi() -> None:
    steps = instructions(ADDON / "Dockerfile")
    copies = [arguments for instruction, arguments in steps if instruction == "COPY"]
    assert copies == ["wheels/ ./wheels/", "rootfs /"]
    assert (ADDON / "wheels").is_dir()
    requirement = dockerfile_arg(ADDON / "Dockerfile", "SOPRANO_REQUIREMENT")
    version = load_yaml(ADDON / "config.yaml")["version"]
    assert requirement == f"wyoming-soprano[wyoming]=={version}"
    setup_version = re.search(r"^version = (.+)$", (ROOT / "setup.cfg").read_text(), re.M)
    assert setup_version and setup_version[1] == version
    run = " ".join(arguments for instruction, arguments in steps if instruction == "RUN")
    for package in ("g++", "python3-dev", "python3-venv"):
        assert package in run
