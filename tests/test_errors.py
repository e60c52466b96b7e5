"""One error vocabulary: every code a class of `rbee_common/errors.py`, drawn in its docstring, and a
client maps an envelope back to the same class whatever it imported."""

from __future__ import annotations

import importlib
import pkgutil

import rbee_common
import rbee_hive
import rbee_keeper
import rbee_queen
import rbee_worker
from rbee_common import errors
from rbee_common.errors import (
    CLASSES_BY_CODE,
    ErrorBody,
    HiveNotFound,
    ModelNotFound,
    NotFound,
    RbeeError,
    ServiceUnavailable,
    error_from_body,
)


def _every_module() -> None:
    for package in (rbee_common, rbee_hive, rbee_queen, rbee_worker, rbee_keeper):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(module.name)


def _subclasses(cls: type[RbeeError]) -> set[type[RbeeError]]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= _subclasses(sub)
    return found


def test_every_error_class_of_every_program_is_in_the_one_tree() -> None:
    _every_module()
    outside = sorted(f"{cls.__module__}.{cls.__name__}" for cls in _subclasses(RbeeError)
                     if cls.__module__ != errors.__name__)
    assert outside == []
    doc = errors.__doc__ or ""
    for code, cls in CLASSES_BY_CODE.items():
        assert cls.__name__ in doc and code in doc, (cls, code)
    codes = [vars(cls)["code"] for cls in _subclasses(RbeeError) if "code" in vars(cls)]
    assert len(codes) == len(set(codes)), "two classes with one code"


def test_an_envelope_becomes_the_class_its_code_names() -> None:
    error = error_from_body(ErrorBody(code="MODEL_NOT_FOUND", message="gone", details={"hint": "h"}), 404)
    assert isinstance(error, ModelNotFound) and isinstance(error, NotFound)
    assert (error.code, error.status, error.message, error.hint) == ("MODEL_NOT_FOUND", 404, "gone", "h")
    assert type(error_from_body(ErrorBody(code="HIVE_NOT_FOUND", message="m"), 404)) is HiveNotFound


def test_a_newer_peers_code_keeps_its_code_in_the_class_of_its_status() -> None:
    error = error_from_body(ErrorBody(code="GPU_ON_FIRE", message="too hot"), 503)
    assert type(error) is ServiceUnavailable and error.code == "GPU_ON_FIRE" and error.status == 503
    assert error.to_body().code == "GPU_ON_FIRE"  # relayed as it came
