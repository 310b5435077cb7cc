"""dlib's own small-matrix linear algebra, reproduced operation by operation in Python floats.

dlib (as built in the dlib-bin wheel, without LAPACK) computes similarity fits and affine maps with its
Golub-Reinsch SVD (`svd4` in dlib/matrix/matrix_la.h) and `pinv` on top of it. Any other SVD agrees only to
~1e-16, which is enough to move a coordinate lying within 1e-13 of a pixel or rounding boundary to the other side.
Python floats are IEEE doubles and these functions perform dlib's operations in dlib's order (no fused
multiply-add, as in dlib's x86-64 build), so the results are the same to the last bit. For 2x2 and 3x3 matrices
only: pure Python is fast enough there and slow elsewhere.
"""

from __future__ import annotations

import math
import sys

Mat = list[list[float]]


def svd4(a: Mat) -> tuple[Mat, list[float], Mat]:
    """dlib's svd4(SVD_SKINNY_U, withv=true, a) for an m x n matrix with m >= n: a = u diag(q) v^T."""
    m, n = len(a), len(a[0])
    eps = sys.float_info.epsilon
    tol = sys.float_info.min / eps
    u = [list(map(float, row)) for row in a]
    q = [0.0] * n
    e = [0.0] * n
    v = [[0.0] * n for _ in range(n)]
    g = x = 0.0
    l = 0
    # Householder's reduction to bidiagonal form
    for i in range(n):
        e[i] = g
        s = 0.0
        l = i + 1
        for j in range(i, m):
            s += u[j][i] * u[j][i]
        if s < tol:
            g = 0.0
        else:
            f = u[i][i]
            g = math.sqrt(s) if f < 0 else -math.sqrt(s)
            h = f * g - s
            u[i][i] = f - g
            for j in range(l, n):
                s = 0.0
                for k in range(i, m):
                    s += u[k][i] * u[k][j]
                f = s / h
                for k in range(i, m):
                    u[k][j] += f * u[k][i]
        q[i] = g
        s = 0.0
        for j in range(l, n):
            s += u[i][j] * u[i][j]
        if s < tol:
            g = 0.0
        else:
            f = u[i][i + 1]
            g = math.sqrt(s) if f < 0 else -math.sqrt(s)
            h = f * g - s
            u[i][i + 1] = f - g
            for j in range(l, n):
                e[j] = u[i][j] / h
            for j in range(l, m):
                s = 0.0
                for k in range(l, n):
                    s += u[j][k] * u[i][k]
                for k in range(l, n):
                    u[j][k] += s * e[k]
        y = abs(q[i]) + abs(e[i])
        if y > x:
            x = y
    # accumulation of right-hand transformations
    for i in range(n - 1, -1, -1):
        if g != 0.0:
            h = u[i][i + 1] * g
            for j in range(l, n):
                v[j][i] = u[i][j] / h
            for j in range(l, n):
                s = 0.0
                for k in range(l, n):
                    s += u[i][k] * v[k][j]
                for k in range(l, n):
                    v[k][j] += s * v[k][i]
        for j in range(l, n):
            v[i][j] = v[j][i] = 0.0
        v[i][i] = 1.0
        g = e[i]
        l = i
    # accumulation of left-hand transformations (u is m x n)
    for i in range(n - 1, -1, -1):
        l = i + 1
        g = q[i]
        for j in range(l, n):
            u[i][j] = 0.0
        if g != 0.0:
            h = u[i][i] * g
            for j in range(l, n):
                s = 0.0
                for k in range(l, m):
                    s += u[k][i] * u[k][j]
                f = s / h
                for k in range(i, m):
                    u[k][j] += f * u[k][i]
            for j in range(i, m):
                u[j][i] /= g
        else:
            for j in range(i, m):
                u[j][i] = 0.0
        u[i][i] += 1.0
    # diagonalisation of the bidiagonal form
    eps *= x
    for k in range(n - 1, -1, -1):
        iterations = 0
        while True:
            # test for splitting (e[0] is always 0, so the search stops at l = 0 at the latest)
            cancel = False
            for l in range(k, -1, -1):  # noqa: B007 - l is used after the loop, as in dlib
                if abs(e[l]) <= eps:
                    break
                if abs(q[l - 1]) <= eps:
                    cancel = True
                    break
            if cancel:
                c, s = 0.0, 1.0
                l1 = l - 1
                for i in range(l, k + 1):
                    f = s * e[i]
                    e[i] *= c
                    if abs(f) <= eps:
                        break
                    g = q[i]
                    h = q[i] = math.sqrt(f * f + g * g)
                    c = g / h
                    s = -f / h
                    for j in range(m):
                        y = u[j][l1]
                        z = u[j][i]
                        u[j][l1] = y * c + z * s
                        u[j][i] = -y * s + z * c
            # test for convergence
            z = q[k]
            if l == k:
                break
            iterations += 1
            if iterations > 300:
                raise ArithmeticError("dlib's SVD did not converge")
            # shift from the bottom 2x2 minor
            x = q[l]
            y = q[k - 1]
            g = e[k - 1]
            h = e[k]
            f = ((y - z) * (y + z) + (g - h) * (g + h)) / (2 * h * y)
            g = math.sqrt(f * f + 1.0)
            f = ((x - z) * (x + z) + h * (y / ((f - g) if f < 0 else (f + g)) - h)) / x
            # next QR transformation
            c = s = 1.0
            for i in range(l + 1, k + 1):
                g = e[i]
                y = q[i]
                h = s * g
                g *= c
                e[i - 1] = z = math.sqrt(f * f + h * h)
                c = f / z
                s = h / z
                f = x * c + g * s
                g = -x * s + g * c
                h = y * s
                y *= c
                for j in range(n):
                    x = v[j][i - 1]
                    z = v[j][i]
                    v[j][i - 1] = x * c + z * s
                    v[j][i] = -x * s + z * c
                q[i - 1] = z = math.sqrt(f * f + h * h)
                if z != 0:
                    c = f / z
                    s = h / z
                f = c * g + s * y
                x = -s * g + c * y
                for j in range(m):
                    y = u[j][i - 1]
                    z = u[j][i]
                    u[j][i - 1] = y * c + z * s
                    u[j][i] = -y * s + z * c
            e[l] = 0.0
            e[k] = f
            q[k] = x
        # convergence: make q[k] non-negative
        if z < 0.0:
            q[k] = -z
            for j in range(n):
                v[j][k] = -v[j][k]
    return u, q, v


def matmul(a: Mat, b: Mat) -> Mat:
    """dlib's small-matrix product: each element summed in order of the inner index."""
    out = []
    for row in a:
        out_row = []
        for c in range(len(b[0])):
            total = row[0] * b[0][c]
            for k in range(1, len(b)):
                total += row[k] * b[k][c]
            out_row.append(total)
        out.append(out_row)
    return out


def transpose(a: Mat) -> Mat:
    return [list(col) for col in zip(*a, strict=True)]


def pinv(a: Mat) -> Mat:
    """dlib's pinv for a square (or tall) matrix: v diag(1/w) u^T, tiny singular values dropped."""
    u, w, v = svd4(a)
    eps = sys.float_info.epsilon * max(len(a), len(a[0])) * max(w)
    inv = [1.0 / x if (x >= eps or x <= -eps) and x != 0 else 0.0 for x in w]
    scaled = [[v[i][j] * inv[j] for j in range(len(w))] for i in range(len(v))]
    return matmul(scaled, transpose(u))


