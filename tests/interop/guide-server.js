// Copied verbatim from the Nexus WebSocket guide (section Server Implementation); do not edit:
// the interop tests prove that code written from the guide works with ours.
// server.js
const WebSocket = require('ws');
const http = require('http');
const url = require('url');
const jwt = require('jsonwebtoken');

// Create HTTP server
const server = http.createServer();

// Create WebSocket server
const wss = new WebSocket.Server({
  server,
  path: '/v1/ws'
});

// Store active connections
const clients = new Map();

// Authentication middleware
function authenticate(request) {
  const params = url.parse(request.url, true).query;
  const token = params.token || request.headers['authorization']?.replace('Bearer ', '');
  
  if (!token) {
    throw new Error('Missing authentication token');
  }
  
  try {
    const decoded = jwt.verify(token, process.env.JWT_SECRET);
    return decoded;
  } catch (error) {
    throw new Error('Invalid token');
  }
}

// WebSocket connection handler
wss.on('connection', (ws, request) => {
  let user = null;
  let clientId = null;
  
  try {
    // Authenticate connection
    user = authenticate(request);
    clientId = generateClientId();
    
    // Store connection
    clients.set(clientId, {
      ws,
      user,
      subscriptions: new Set(),
      connected_at: Date.now(),
      last_ping: Date.now()
    });
    
    console.log(`Client connected: ${clientId} (${user.email})`);
    
    // Send welcome message
    send(ws, {
      type: 'connected',
      id: generateMessageId(),
      timestamp: new Date().toISOString(),
      payload: {
        client_id: clientId,
        server_time: new Date().toISOString()
      }
    });
    
  } catch (error) {
    console.error('Authentication failed:', error.message);
    ws.send(JSON.stringify({
      type: 'error',
      error: {
        code: 'AUTH_FAILED',
        message: error.message
      }
    }));
    ws.close(4000, 'Authentication failed');
    return;
  }
  
  // Message handler
  ws.on('message', (data) => {
    try {
      const message = JSON.parse(data);
      handleMessage(clientId, message);
    } catch (error) {
      console.error('Invalid message:', error.message);
      send(ws, {
        type: 'error',
        id: generateMessageId(),
        error: {
          code: 'INVALID_MESSAGE',
          message: 'Invalid JSON format'
        }
      });
    }
  });
  
  // Ping/pong for connection health
  ws.on('pong', () => {
    const client = clients.get(clientId);
    if (client) {
      client.last_ping = Date.now();
    }
  });
  
  // Close handler
  ws.on('close', (code, reason) => {
    console.log(`Client disconnected: ${clientId}, code: ${code}, reason: ${reason}`);
    clients.delete(clientId);
  });
  
  // Error handler
  ws.on('error', (error) => {
    console.error(`WebSocket error for ${clientId}:`, error);
    clients.delete(clientId);
  });
});

// Message handler
function handleMessage(clientId, message) {
  const client = clients.get(clientId);
  if (!client) return;
  
  const { type, id, payload } = message;
  
  switch (type) {
    case 'ping':
      send(client.ws, {
        type: 'pong',
        id,
        timestamp: new Date().toISOString()
      });
      break;
      
    case 'subscribe':
      handleSubscribe(clientId, payload);
      send(client.ws, {
        type: 'subscribed',
        id,
        timestamp: new Date().toISOString(),
        payload: {
          channel: payload.channel,
          filters: payload.filters
        }
      });
      break;
      
    case 'unsubscribe':
      handleUnsubscribe(clientId, payload);
      send(client.ws, {
        type: 'unsubscribed',
        id,
        timestamp: new Date().toISOString(),
        payload: {
          channel: payload.channel
        }
      });
      break;
      
    case 'command':
      handleCommand(clientId, payload)
        .then(result => {
          send(client.ws, {
            type: 'command.result',
            id,
            timestamp: new Date().toISOString(),
            payload: result
          });
        })
        .catch(error => {
          send(client.ws, {
            type: 'error',
            id,
            error: {
              code: 'COMMAND_FAILED',
              message: error.message
            }
          });
        });
      break;
      
    case 'telemetry':
      handleTelemetry(clientId, payload);
      send(client.ws, {
        type: 'ack',
        id,
        timestamp: new Date().toISOString()
      });
      break;
      
    default:
      send(client.ws, {
        type: 'error',
        id,
        error: {
          code: 'UNKNOWN_MESSAGE_TYPE',
          message: `Unknown message type: ${type}`
        }
      });
  }
}

// Subscribe handler
function handleSubscribe(clientId, payload) {
  const client = clients.get(clientId);
  if (!client) return;
  
  const { channel, filters } = payload;
  
  // Validate channel
  const validChannels = ['telemetry', 'commands', 'tasks', 'ai', 'events'];
  if (!validChannels.includes(channel)) {
    throw new Error(`Invalid channel: ${channel}`);
  }
  
  // Add subscription
  client.subscriptions.add(JSON.stringify({ channel, filters }));
  
  console.log(`Client ${clientId} subscribed to ${channel}`);
}

// Unsubscribe handler
function handleUnsubscribe(clientId, payload) {
  const client = clients.get(clientId);
  if (!client) return;
  
  const { channel } = payload;
  
  // Remove subscriptions matching channel
  for (const sub of client.subscriptions) {
    const parsed = JSON.parse(sub);
    if (parsed.channel === channel) {
      client.subscriptions.delete(sub);
    }
  }
  
  console.log(`Client ${clientId} unsubscribed from ${channel}`);
}

// Broadcast message to subscribed clients
function broadcast(channel, message, filters = {}) {
  clients.forEach((client, clientId) => {
    // Check if client is subscribed to channel
    for (const sub of client.subscriptions) {
      const parsed = JSON.parse(sub);
      if (parsed.channel === channel) {
        // Apply filters
        if (matchesFilters(message, parsed.filters)) {
          send(client.ws, {
            type: `${channel}.update`,
            id: generateMessageId(),
            timestamp: new Date().toISOString(),
            payload: message
          });
        }
      }
    }
  });
}

// Helper functions
function send(ws, message) {
  if (ws.readyState === WebSocket.OPEN) {
    ws.send(JSON.stringify(message));
  }
}

function generateClientId() {
  return `client-${Date.now()}-${Math.random().toString(36).substr(2, 9)}`;
}

function generateMessageId() {
  return `msg-${Date.now()}-${Math.random().toString(36).substr(2, 9)}`;
}

function matchesFilters(message, filters) {
  if (!filters) return true;
  
  for (const [key, value] of Object.entries(filters)) {
    if (message[key] !== value) {
      return false;
    }
  }
  
  return true;
}

// Heartbeat to detect broken connections
const heartbeatInterval = setInterval(() => {
  const now = Date.now();
  
  clients.forEach((client, clientId) => {
    // Close connections that haven't responded to ping in 60 seconds
    if (now - client.last_ping > 60000) {
      console.log(`Client ${clientId} timeout, closing connection`);
      client.ws.terminate();
      clients.delete(clientId);
      return;
    }
    
    // Send ping
    if (client.ws.readyState === WebSocket.OPEN) {
      client.ws.ping();
    }
  });
}, 30000); // Every 30 seconds

// Graceful shutdown
process.on('SIGTERM', () => {
  console.log('SIGTERM received, closing server...');
  clearInterval(heartbeatInterval);
  
  clients.forEach((client, clientId) => {
    client.ws.close(1000, 'Server shutting down');
  });
  
  wss.close(() => {
    console.log('WebSocket server closed');
    server.close(() => {
      console.log('HTTP server closed');
      process.exit(0);
    });
  });
});

// Start server
const PORT = process.env.WS_PORT || 3001;
server.listen(PORT, () => {
  console.log(`WebSocket server listening on port ${PORT}`);
});

module.exports = { wss, broadcast };
