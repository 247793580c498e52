pytest_plugins = ("feedfan.testing.plugin",)
