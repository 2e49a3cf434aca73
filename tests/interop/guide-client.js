// Copied verbatim from the Nexus WebSocket guide (section Client Implementation, minus its usage example); do not edit:
// the interop tests prove that code written from the guide works with ours.
// client.js
const WebSocket = require('ws');
const EventEmitter = require('events');

class NexusWSClient extends EventEmitter {
  constructor(url, token, options = {}) {
    super();
    this.url = url;
    this.token = token;
    this.options = {
      reconnect: true,
      reconnectInterval: 5000,
      maxReconnectAttempts: 10,
      ...options
    };
    
    this.ws = null;
    this.clientId = null;
    this.reconnectAttempts = 0;
    this.messageQueue = [];
    this.subscriptions = new Map();
    this.connected = false;
  }
  
  connect() {
    const url = `${this.url}?token=${this.token}`;
    this.ws = new WebSocket(url);
    
    this.ws.on('open', () => {
      console.log('WebSocket connected');
      this.connected = true;
      this.reconnectAttempts = 0;
      
      // Process queued messages
      while (this.messageQueue.length > 0) {
        const message = this.messageQueue.shift();
        this.send(message);
      }
      
      // Resubscribe to channels
      this.subscriptions.forEach((filters, channel) => {
        this.subscribe(channel, filters);
      });
      
      this.emit('connected');
    });
    
    this.ws.on('message', (data) => {
      try {
        const message = JSON.parse(data);
        this.handleMessage(message);
      } catch (error) {
        console.error('Failed to parse message:', error);
      }
    });
    
    this.ws.on('close', (code, reason) => {
      console.log(`WebSocket closed: ${code} - ${reason}`);
      this.connected = false;
      this.emit('disconnected', { code, reason });
      
      if (this.options.reconnect) {
        this.reconnect();
      }
    });
    
    this.ws.on('error', (error) => {
      console.error('WebSocket error:', error);
      this.emit('error', error);
    });
    
    // Send periodic pings
    this.pingInterval = setInterval(() => {
      if (this.connected) {
        this.send({
          type: 'ping',
          id: this.generateId(),
          timestamp: new Date().toISOString()
        });
      }
    }, 30000);
  }
  
  reconnect() {
    if (this.reconnectAttempts >= this.options.maxReconnectAttempts) {
      console.error('Max reconnection attempts reached');
      this.emit('reconnect_failed');
      return;
    }
    
    this.reconnectAttempts++;
    console.log(`Reconnecting... (attempt ${this.reconnectAttempts})`);
    
    setTimeout(() => {
      this.connect();
    }, this.options.reconnectInterval);
  }
  
  handleMessage(message) {
    const { type, id, payload, error } = message;
    
    switch (type) {
      case 'connected':
        this.clientId = payload.client_id;
        console.log(`Client ID: ${this.clientId}`);
        break;
        
      case 'pong':
        // Heartbeat response
        break;
        
      case 'subscribed':
        console.log(`Subscribed to ${payload.channel}`);
        break;
        
      case 'unsubscribed':
        console.log(`Unsubscribed from ${payload.channel}`);
        break;
        
      case 'telemetry.update':
      case 'commands.update':
      case 'tasks.update':
      case 'ai.update':
      case 'events.update':
        this.emit(type, payload);
        break;
        
      case 'command.result':
        this.emit('command_result', payload);
        break;
        
      case 'ack':
        this.emit('ack', { id });
        break;
        
      case 'error':
        console.error('Server error:', error);
        this.emit('server_error', error);
        break;
        
      default:
        console.warn('Unknown message type:', type);
    }
  }
  
  send(message) {
    if (!this.connected) {
      this.messageQueue.push(message);
      return;
    }
    
    if (this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(message));
    }
  }
  
  subscribe(channel, filters = {}) {
    this.subscriptions.set(channel, filters);
    
    this.send({
      type: 'subscribe',
      id: this.generateId(),
      timestamp: new Date().toISOString(),
      payload: { channel, filters }
    });
  }
  
  unsubscribe(channel) {
    this.subscriptions.delete(channel);
    
    this.send({
      type: 'unsubscribe',
      id: this.generateId(),
      timestamp: new Date().toISOString(),
      payload: { channel }
    });
  }
  
  sendTelemetry(data) {
    this.send({
      type: 'telemetry',
      id: this.generateId(),
      timestamp: new Date().toISOString(),
      payload: data
    });
  }
  
  executeCommand(command) {
    this.send({
      type: 'command',
      id: this.generateId(),
      timestamp: new Date().toISOString(),
      payload: command
    });
  }
  
  disconnect() {
    clearInterval(this.pingInterval);
    this.options.reconnect = false;
    
    if (this.ws) {
      this.ws.close(1000, 'Client disconnecting');
    }
  }
  
  generateId() {
    return `msg-${Date.now()}-${Math.random().toString(36).substr(2, 9)}`;
  }
}

module.exports = NexusWSClient;
