"""Ptychodus adapter: reconstructor library, settings, registration. Never imports Qt."""
