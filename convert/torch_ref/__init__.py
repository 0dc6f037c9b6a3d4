"""Plain PyTorch references written from the spec, with the original module trees and state-dict key
names. They need torch (the `verify`/`test` extras); `seed-story convert --verify` and the parity
tests import them. Nothing here is imported by the JAX package itself."""
