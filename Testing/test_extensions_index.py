"""Extensions Index readiness (issue #23 item 10): MASRefine.json (the description file the Slicer Extensions
Index takes) and the top-level CMakeLists.txt's metadata, checked as the Index's own checks do.

The facts below are vendored, not downloaded (the Index's schema is under the 3D Slicer license, whose Part B
must travel with copies, so only the facts are copied):

- the catalog-entry schema, ``schemas/slicer-extension-catalog-entry-schema-v1.0.2.json`` of Slicer/ExtensionsIndex
  at 07f1d1b2781c7dd9f6e2a9f5521b3ed43631724c (the same file is ``Schemas/`` in Slicer/Slicer main): required
  ``$schema``, ``category``, ``scm_url``; ``additionalProperties: false``; the properties and types below;
  ``scm_type`` one of git/local; ``tier`` an integer 1..5;
- the Index's ``scripts/check_description_files.py`` (same commit), run on every submitted file:
  ``check_json_file_format`` (:97, LF line endings only), ``check_category`` (:169, one of
  ``ACCEPTED_EXTENSION_CATEGORIES``, :802, which holds "Segmentation" at :841), ``check_scm_url_syntax`` (:176,
  git or https), ``check_extension_name`` (:189, the file's name must not start with "Slicer"),
  ``check_git_repository_name`` (:206, the repository's must), ``check_cmakelists_content`` (:369, ``project()``
  equals the file's name, ``EXTENSION_ICONURL`` and ``EXTENSION_SCREENSHOTURLS`` found by the regular expressions
  copied below, each an http(s) URL of a PNG/JPEG/GIF), ``check_license_file`` (:486, one of the names below at the
  repository's root), ``check_repository_size`` (:463, at most 100 MB checked out), ``check_dependencies`` (:510,
  every build dependency is an extension of the Index: PyTorch.json is there).

What only the Index can check (the URLs answer, the GitHub topic ``3d-slicer-extension``, :237) is listed in
docs/slicer.md.
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESCRIPTION = ROOT / "MASRefine.json"
CMAKE = ROOT / "CMakeLists.txt"

SCHEMA_URL = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json#"
SCHEMA_REQUIRED = ("$schema", "category", "scm_url")
SCHEMA_PROPERTIES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                     "build_dependencies": list, "dicom_support_rule": str, "build_subdirectory": str,
                     "enabled": bool, "tier": int}
SCM_TYPES = ("git", "local")
INDEX_EXTENSIONS_USED = {"PyTorch"}  # build dependencies known to exist in the Index (PyTorch.json)
LICENSE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")
ICON_URL_PATTERN = r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)'
SCREENSHOT_URLS_PATTERN = r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)'
PROJECT_PATTERN = r'project\s*\(\s*([^\s\)\n\r]+)'


def description() -> dict:
    return json.loads(DESCRIPTION.read_text(encoding="utf-8"))


def cmake() -> str:
    return CMAKE.read_text(encoding="utf-8")


def cmake_var(name: str) -> str:
    m = re.search(r"set\(\s*" + name + r'\s+"([^"]*)"', cmake())
    assert m, f"CMakeLists.txt: no set({name} \"...\")"
    return m.group(1)


def test_description_file_follows_the_catalog_schema():
    raw = DESCRIPTION.read_bytes()
    assert b"\r" not in raw, "the Index accepts LF line endings only"
    d = description()
    assert d["$schema"] == SCHEMA_URL
    for key in SCHEMA_REQUIRED:
        assert key in d, f"{DESCRIPTION.name}: {key} is required"
    for key, value in d.items():
        assert key in SCHEMA_PROPERTIES, f"{DESCRIPTION.name}: {key} is not allowed (additionalProperties: false)"
        assert isinstance(value, SCHEMA_PROPERTIES[key]) and not (SCHEMA_PROPERTIES[key] is int and isinstance(value, bool)), key
    assert all(isinstance(x, str) for x in d.get("build_dependencies", []))
    assert d.get("scm_type", "git") in SCM_TYPES
    assert 1 <= d.get("tier", 1) <= 5
    assert d.get("build_subdirectory", ".") == "."  # not a superbuild: CMake is configured at the root


def test_description_file_passes_the_indexs_checks():
    d = description()
    name = DESCRIPTION.stem
    # the file's name is the extension's: CMake's project(), never starting with "Slicer"
    assert re.findall(PROJECT_PATTERN, cmake(), re.IGNORECASE | re.MULTILINE)[0] == name
    assert not name.lower().startswith("slicer")
    url = urllib.parse.urlsplit(d["scm_url"])
    assert url.scheme in ("git", "https") and "://" in d["scm_url"]
    repo = url.path.strip("/").split("/")[-1].removesuffix(".git")
    assert repo.startswith("Slicer"), "the Index wants the repository named Slicer<Name>"
    assert d["category"] == "Segmentation" == cmake_var("EXTENSION_CATEGORY")  # accepted by the Index (:841)
    # the homepage is the same repository; the module sits in the same category
    assert cmake_var("EXTENSION_HOMEPAGE").startswith(d["scm_url"])
    module = ast.parse((ROOT / "MASRefine" / "MASRefine.py").read_text(encoding="utf-8"))
    assert 'translate("qSlicerAbstractCoreModule", "Segmentation")' in ast.unparse(module).replace("'", '"')
    # build dependencies: CMake's EXTENSION_DEPENDS, each one an extension of the Index
    assert d["build_dependencies"] == cmake_var("EXTENSION_DEPENDS").split()
    assert set(d["build_dependencies"]) <= INDEX_EXTENSIONS_USED
    assert any((ROOT / n).is_file() for n in LICENSE_NAMES)


def _raw_github_file(url: str, scm_url: str) -> Path:
    """The file of this repository a raw.githubusercontent.com URL of the scm_url's repository names."""
    owner_repo = urllib.parse.urlsplit(scm_url).path.strip("/")
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/"
    assert url.startswith(prefix), f"{url} is not a file of {scm_url}"
    branch, _, path = url[len(prefix):].partition("/")
    assert branch == description()["scm_revision"], url
    return ROOT / path


def test_icon_and_screenshot_urls_name_images_of_this_repository():
    text = cmake()
    icons = re.findall(ICON_URL_PATTERN, text, re.IGNORECASE | re.MULTILINE)
    shots = re.findall(SCREENSHOT_URLS_PATTERN, text, re.IGNORECASE | re.MULTILINE)
    assert icons and shots, "the Index finds EXTENSION_ICONURL and EXTENSION_SCREENSHOTURLS with these expressions"
    urls = [icons[0].strip()] + shots[0].split()
    assert len(urls) >= 2
    for url in urls:
        assert url.startswith("http") and url.lower().endswith((".png", ".jpg", ".jpeg", ".gif")), url
        path = _raw_github_file(url, description()["scm_url"])
        assert path.is_file(), f"{url}: {path.relative_to(ROOT)} is not in the repository"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(path.relative_to(ROOT))], cwd=ROOT,
                                 capture_output=True).returncode == 0
        assert tracked, f"{path.relative_to(ROOT)} is not committed, so the URL would not answer"


def test_repository_stays_under_the_indexs_size_limit():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    total = sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())
    assert total < 100 * 1024 * 1024, f"{total / 2**20:.1f} MB checked out; the Index refuses more than 100 MB"
