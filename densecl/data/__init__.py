"""Unlabelled images for pre-training and their two views: synthetic scenes, image folders, augmentation."""
