"""Registered third-party models (nnU-Net v2 today; MONAI bundles next): the registry on disk,
one importer per format, and the inference each format needs to equal its own predictor.

Domain code (no grpc): `registry` (manifests, digests, listing), `nnunet` (import of an
nnU-Net v2 trained-model folder), `nnunet_infer` (nnUNetPredictor's default inference, in
atlasflow's own code), `segment` (NIfTI in, label map out).
"""
