"""Backbone weights in and out: the torchvision-named export, published layouts read, detectron2 conversion."""
