"""Host-side page allocator of the paged KV cache: a free list over the pool's pages with
reference counts (a prompt's full pages are shared by the samples admitted with it).

Page 0 is the null page: never handed out, it is where unused page-table entries point and
where idle slots' decode writes land (never read as visible), so the device loop needs no
branch for them.
"""

from __future__ import annotations

NULL_PAGE = 0


class PageAllocator:
    """Free list + reference counts over pages 1..num_pages-1 of one pool."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"a page pool needs at least 2 pages (one is the null page), "
                             f"got {num_pages}")
        self.num_pages = int(num_pages)
        # popped from the end: low page numbers first (deterministic layouts, easier debugging)
        self._free = list(range(self.num_pages - 1, 0, -1))
        self._refs = [0] * self.num_pages

    @property
    def free(self) -> int:
        """Pages that can be allocated now."""
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Pages that can ever be allocated (the pool less the null page)."""
        return self.num_pages - 1

    def allocate(self, n: int) -> list[int]:
        """`n` fresh pages (reference count 1 each); raises if fewer are free (check `free`)."""
        if n > len(self._free):
            raise RuntimeError(f"page pool exhausted: {n} pages asked, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._refs[p] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        """One more owner for each of `pages`."""
        for p in pages:
            if self._refs[p] <= 0:
                raise RuntimeError(f"page {p} is not allocated")
            self._refs[p] += 1

    def release(self, pages: list[int]) -> None:
        """Drop one owner of each of `pages`; a page without owners returns to the free list."""
        for p in pages:
            if p == NULL_PAGE:
                continue
            if self._refs[p] <= 0:
                raise RuntimeError(f"page {p} released more often than allocated")
            self._refs[p] -= 1
            if self._refs[p] == 0:
                self._free.append(p)
