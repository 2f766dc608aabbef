// The gateway's review API (/api/v1, docs/gateway.md). The session is the HttpOnly cookie set by
// POST /login; every change carries the CSRF header the gateway requires of cookie callers.

export class ApiError extends Error {
  constructor(status, reason, message) {
    super(message || reason || `HTTP ${status}`)
    this.status = status
    this.reason = reason || ''
  }
}

const CSRF = { 'X-Atlasflow-Request': '1' }

async function call(method, path, body, { keepalive = false } = {}) {
  const init = { method, headers: { Accept: 'application/json' }, credentials: 'same-origin', keepalive }
  if (method !== 'GET') Object.assign(init.headers, CSRF)
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json'
    init.body = JSON.stringify(body)
  }
  const resp = await fetch(path, init)
  const text = await resp.text()
  let doc = null
  try {
    doc = text ? JSON.parse(text) : null
  } catch {
    doc = null
  }
  if (!resp.ok) {
    const err = (doc && doc.error) || {}
    throw new ApiError(resp.status, err.reason, err.message || text.slice(0, 200))
  }
  return doc
}

export const api = {
  login: (username, password) => call('POST', '/login', { username, password }),
  logout: () => call('POST', '/logout'),
  me: () => call('GET', '/api/v1/me'),
  rounds: () => call('GET', '/api/v1/rounds'),
  worklist(filters = {}) {
    const q = new URLSearchParams()
    for (const o of filters.organs || []) q.append('organ', o)
    for (const s of filters.statuses || []) q.append('status', s)
    if (filters.round) q.set('round', String(filters.round))
    q.set('page_size', '100')
    return call('GET', `/api/v1/worklist?${q}`)
  },
  case: (id) => call('GET', `/api/v1/cases/${encodeURIComponent(id)}`),
  lease: (id, seconds) => call('POST', `/api/v1/cases/${encodeURIComponent(id)}/lease`, { duration_s: seconds }),
  renew: (id, seconds) => call('POST', `/api/v1/cases/${encodeURIComponent(id)}/lease/renew`, { duration_s: seconds }),
  release: (id, opts) => call('DELETE', `/api/v1/cases/${encodeURIComponent(id)}/lease`, undefined, opts),
  complete: (id, outcome, versionId) =>
    call('POST', `/api/v1/cases/${encodeURIComponent(id)}/complete`, { outcome, label_version_id: versionId }),
  revise: (id, body) => call('POST', `/api/v1/cases/${encodeURIComponent(id)}/revisions`, body),
}
