"""One exception type for every user-facing error: the CLI prints its message on one line, exit 2."""


class EdgesmithError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ConfigError(EdgesmithError):
    """A recipe/flag value is wrong; `key` is the dotted path of the offending field."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.detail = message
        super().__init__(f"{key}: {message}" if key else message)

    def prefixed(self, prefix: str) -> "ConfigError":
        key = f"{prefix}.{self.key}" if self.key else prefix
        return ConfigError(key, self.detail)


class NativeCrash(EdgesmithError):
    """Native code (llama.cpp, onnxruntime) died in a child process."""
