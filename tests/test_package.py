"""The one import namespace: engine, callbacks and recipes under qat_plugin."""

import qat_plugin


def test_callbacks_and_recipes_are_reachable_from_the_package():
    from qat_plugin.callbacks import QuantizationScheduler
    from qat_plugin.recipes import Recipe

    assert qat_plugin.callbacks.QuantizationScheduler is QuantizationScheduler
    assert isinstance(qat_plugin.recipes.get("int8"), Recipe)
    assert "int8" in qat_plugin.recipes.names()


def test_public_api_names_exist():
    missing = [name for name in qat_plugin.__all__ if not hasattr(qat_plugin, name)]
    assert missing == []
