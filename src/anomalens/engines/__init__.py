"""Engines that run a detector over many images: local, Ray, HTTP serve. They share one run writer (``core``)."""
