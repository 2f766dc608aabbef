"""Label service: immutable label versions with provenance, AbdomenAtlas export."""
