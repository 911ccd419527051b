"""Guest image bundles: a kernel, qvm's initramfs and a read-only root filesystem, with a signed manifest.

`build` makes a bundle, `manifest` defines and signs it, `verify` checks it before every launch.
"""
