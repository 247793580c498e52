"""The pinterest example project: pins fanned out to followers' feeds by feedfan."""
