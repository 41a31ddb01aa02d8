"""Ptychodus adapter: reconstructor library, settings, registration.

Never imports Qt itself: the GUI panel is named by a dotted path (``names.VIEW_FACTORY``) and
imported only when Ptychodus's Qt controller asks for it, so ``ptychodus -b`` never loads Qt.
"""
